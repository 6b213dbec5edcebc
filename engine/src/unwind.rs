//! Stack unwinding with the `.eh_frame` call-frame information of every mapped object, so it
//! works without frame pointers. Where the information runs out (no FDE, a CFA expression),
//! the rest of the stack is scanned conservatively: every word is treated as a possible return
//! address, so a function is never wrongly judged inactive.
use crate::elf::ElfFile;
use crate::error::{Error, Result};
use crate::process::{Mapping, MemoryReader};
use crate::ptrace::Regs;
use gimli::{BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, RegisterRule, UnwindContext, UnwindSection};
use std::collections::HashMap;
use std::path::PathBuf;

const MAX_FRAMES: usize = 1024;
/// How much stack a conservative scan reads at most.
const MAX_SCAN: u64 = 8 << 20;

// DWARF register numbers on x86-64.
const RBX: usize = 3;
const RBP: usize = 6;
const RSP: usize = 7;
const R12: usize = 12;
const R15: usize = 15;
const RA: usize = 16;

/// Unwind tables of one mapped object.
pub struct Module {
    pub name: String,
    /// Live range of the object's mappings.
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    eh_frame: Vec<u8>,
    eh_frame_svma: u64,
    hdr: Option<(Vec<u8>, u64)>,
    text_svma: u64,
}

impl Module {
    /// Unwind tables from an ELF image (as the file holds it) loaded with `bias`.
    pub fn from_elf(name: &str, elf: &ElfFile, start: u64, end: u64, bias: u64) -> Option<Module> {
        let (sec, data) = elf.section_data(".eh_frame")?;
        let hdr = elf.section_data(".eh_frame_hdr").map(|(s, d)| (d.to_vec(), s.addr));
        let text_svma = elf.section(".text").map(|s| s.addr).unwrap_or(0);
        Some(Module { name: name.to_string(), start, end, bias, eh_frame: data.to_vec(), eh_frame_svma: sec.addr, hdr, text_svma })
    }

    fn contains(&self, pc: u64) -> bool {
        pc >= self.start && pc < self.end
    }
}

/// The unwind tables of every object mapped in a process, and the rows already evaluated:
/// threads of one process mostly stand at the same few places, so each row is computed once
/// (this is work done while the target is stopped).
#[derive(Default)]
pub struct Modules {
    pub modules: Vec<Module>,
    /// Gates of the patch regions: a thread parked in one has pushed a known number of words.
    gates: Vec<crate::region::GateRecord>,
    rows: std::cell::RefCell<HashMap<u64, Result<Row, String>>>,
}

/// The part of a CFI row the unwinder uses: the CFA rule and the rules of the callee-saved
/// registers and the return address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    cfa_reg: u16,
    cfa_off: i64,
    rules: Vec<(usize, Rule)>,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |r: usize| match r {
            RBX => "rbx".to_string(),
            RBP => "rbp".to_string(),
            RSP => "rsp".to_string(),
            RA => "the return address".to_string(),
            n => format!("r{n}"),
        };
        write!(f, "CFA = {}{:+}", name(self.cfa_reg as usize), self.cfa_off)?;
        for (r, rule) in &self.rules {
            match rule {
                Rule::Offset(o) => write!(f, ", {} at CFA{o:+}", name(*r))?,
                Rule::ValOffset(o) => write!(f, ", {} = CFA{o:+}", name(*r))?,
                Rule::Register(x) => write!(f, ", {} in {}", name(*r), name(*x as usize))?,
                Rule::Unsupported => write!(f, ", {} by an expression", name(*r))?,
                Rule::Undefined | Rule::Same => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Undefined,
    Same,
    Offset(i64),
    ValOffset(i64),
    Register(u16),
    Unsupported,
}

impl Modules {
    /// Load the tables of the objects mapped executable in process `pid`.
    pub fn load(pid: i32, maps: &[Mapping], mem: &dyn MemoryReader) -> Modules {
        let mut by_inode: HashMap<(u64, String), (u64, u64, u64)> = HashMap::new();
        let mut vdso = None;
        for m in maps {
            if m.path == "[vdso]" {
                vdso = Some((m.start, m.end));
            }
            if m.inode == 0 || m.path.is_empty() || m.path.starts_with("/memfd:") {
                continue;
            }
            let e = by_inode.entry((m.inode, m.path.clone())).or_insert((u64::MAX, 0, u64::MAX));
            e.0 = e.0.min(m.start);
            e.1 = e.1.max(m.end);
            if m.offset == 0 {
                e.2 = e.2.min(m.start);
            }
        }
        let mut modules = Vec::new();
        for ((_, path), (start, end, base)) in by_inode {
            if !maps.iter().any(|m| m.path == path && m.is_exec()) || base == u64::MAX {
                continue;
            }
            // Read the file as the target sees it (its mount namespace).
            let file = map_file(pid, maps, &path);
            let Ok(elf) = ElfFile::open(&file) else { continue };
            let bias = base.wrapping_sub(elf.first_page());
            if let Some(m) = Module::from_elf(&path, &elf, start, end, bias) {
                modules.push(m);
            }
        }
        if let Some((start, end)) = vdso {
            if let Ok(bytes) = mem.read_vec(start, (end - start) as usize) {
                if let Ok(elf) = ElfFile::parse(std::path::Path::new("[vdso]"), bytes) {
                    if let Some(m) = Module::from_elf("[vdso]", &elf, start, end, start.wrapping_sub(elf.first_page())) {
                        modules.push(m);
                    }
                }
            }
        }
        let gates = crate::region::read_all(mem, maps).into_iter().filter_map(|(h, _)| h.ok()).flat_map(|h| h.gates).collect();
        Modules { modules, gates, rows: Default::default() }
    }

    /// The tables of one file, at its file addresses (bias 0): for comparing frames of two
    /// builds of a function before anything runs.
    pub fn of_file(elf: &ElfFile) -> Option<Modules> {
        let (lo, hi) = elf.image_range();
        Module::from_elf(&elf.path.display().to_string(), elf, lo, hi, 0).map(|m| Modules { modules: vec![m], gates: Vec::new(), rows: Default::default() })
    }

    /// The CFI row that holds at `addr`.
    pub fn row_at(&self, addr: u64) -> Result<Row, String> {
        row_for(self, addr, &mut UnwindContext::new())
    }

    fn find(&self, pc: u64) -> Option<&Module> {
        self.modules.iter().find(|m| m.contains(pc))
    }
}

/// The file behind a mapping, through `/proc/PID/map_files` (works across mount namespaces),
/// else through the process's root.
pub(crate) fn map_file(pid: i32, maps: &[Mapping], path: &str) -> PathBuf {
    if let Some(m) = maps.iter().find(|m| m.path == path) {
        let p = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

/// What unwinding one thread found.
#[derive(Debug, Clone, Default)]
pub struct Stack {
    /// Program counters, innermost first (return addresses for callers).
    pub pcs: Vec<u64>,
    /// `cfas[i]`: the stack pointer once frame `i` has returned to `pcs[i + 1]`.
    pub cfas: Vec<u64>,
    /// Words of the stack that may be return addresses (where unwinding gave up).
    pub scanned: Vec<u64>,
    /// Why unwinding stopped early, if it did.
    pub incomplete: Option<String>,
    /// `homes[i]`: where frame `i`'s callee-saved registers are kept (see [`SAVED`]).
    pub homes: Vec<[Home; 6]>,
}

/// The callee-saved registers, in the order of [`Stack::homes`] (DWARF numbers).
pub const SAVED: [usize; 6] = [RBX, RBP, R12, 13, 14, R15];

/// Where a frame's register value lives while the thread is stopped: still in the thread's
/// register (no inner frame saved it), in a stack slot where an inner frame saved it, or
/// unknown (a computed value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Home {
    Thread(u16),
    Memory(u64),
    #[default]
    Unknown,
}

fn saved_homes(h: &[Home; 17]) -> [Home; 6] {
    SAVED.map(|r| h[r])
}

/// Stack reads come in small, nearby pieces: serve them from one larger read (fewer system
/// calls while the target is stopped).
struct Cached<'a> {
    inner: &'a dyn MemoryReader,
    window: std::cell::RefCell<(u64, Vec<u8>)>,
}

const WINDOW: usize = 2048;

impl MemoryReader for Cached<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        {
            let w = self.window.borrow();
            if addr >= w.0 && addr.saturating_add(buf.len() as u64) <= w.0 + w.1.len() as u64 {
                let off = (addr - w.0) as usize;
                buf.copy_from_slice(&w.1[off..off + buf.len()]);
                return Ok(());
            }
        }
        if buf.len() <= WINDOW {
            let base = addr & !7;
            if let Ok(v) = self.inner.read_vec(base, WINDOW) {
                let off = (addr - base) as usize;
                if off + buf.len() <= v.len() {
                    buf.copy_from_slice(&v[off..off + buf.len()]);
                    *self.window.borrow_mut() = (base, v);
                    return Ok(());
                }
            }
        }
        self.inner.read(addr, buf)
    }
}

/// Unwind one thread given its registers.
pub fn unwind(regs: &Regs, modules: &Modules, mem: &dyn MemoryReader, maps: &[Mapping]) -> Stack {
    let cached = Cached { inner: mem, window: std::cell::RefCell::new((0, Vec::new())) };
    let mem: &dyn MemoryReader = &cached;
    let mut r: [Option<u64>; 17] = [None; 17];
    let vals = [regs.rax, regs.rdx, regs.rcx, regs.rbx, regs.rsi, regs.rdi, regs.rbp, regs.rsp, regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15, regs.rip];
    for (i, v) in vals.iter().enumerate() {
        r[i] = Some(*v);
    }
    let mut home: [Home; 17] = std::array::from_fn(|i| Home::Thread(i as u16));
    let mut stack = Stack { pcs: vec![regs.rip], homes: vec![saved_homes(&home)], ..Default::default() };
    let mut ctx = UnwindContext::new();
    let mut prev_cfa = 0u64;
    for depth in 0..MAX_FRAMES {
        let pc = r[RA].unwrap_or(0);
        match step(&mut r, &mut home, depth == 0, modules, mem, &mut ctx) {
            Ok(Some(cfa)) => {
                if depth > 0 && cfa <= prev_cfa {
                    stack.incomplete = Some(format!("stack does not grow at {pc:#x}"));
                    break;
                }
                prev_cfa = cfa;
                stack.cfas.push(cfa);
                match r[RA] {
                    Some(0) | None => return stack,
                    Some(ra) => {
                        stack.pcs.push(ra);
                        stack.homes.push(saved_homes(&home));
                    }
                }
            }
            Ok(None) => return stack, // outermost frame
            Err(why) => {
                stack.incomplete = Some(why);
                break;
            }
        }
    }
    if stack.incomplete.is_none() {
        stack.incomplete = Some("too many frames".into());
    }
    // Conservative scan of the rest of this thread's stack.
    let sp = r[RSP].unwrap_or(regs.rsp);
    if let Some(m) = maps.iter().find(|m| m.contains(sp)) {
        let end = m.end.min(sp.saturating_add(MAX_SCAN));
        if let Ok(bytes) = mem.read_vec(sp & !7, (end - (sp & !7)) as usize) {
            stack.scanned = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).filter(|w| *w > 0x1000).collect();
        }
    } else {
        stack.incomplete = Some(format!("{} (stack pointer {sp:#x} is unmapped)", stack.incomplete.take().unwrap_or_default()));
        // Nothing to scan: report the worst case so callers do not proceed blindly.
        stack.scanned = vec![u64::MAX];
    }
    stack
}

/// The CFI row for a (lookup) address, evaluated once.
fn row_for(modules: &Modules, lookup: u64, ctx: &mut UnwindContext<usize>) -> Result<Row, String> {
    if let Some(r) = modules.rows.borrow().get(&lookup) {
        return r.clone();
    }
    let r = compute_row(modules, lookup, ctx);
    modules.rows.borrow_mut().insert(lookup, r.clone());
    r
}

fn compute_row(modules: &Modules, lookup: u64, ctx: &mut UnwindContext<usize>) -> Result<Row, String> {
    if let Some(d) = modules.gates.iter().find_map(|g| g.depth_at(lookup)) {
        // A gate pushes whole words and touches no callee-saved register.
        return Ok(Row { cfa_reg: RSP as u16, cfa_off: 8 * (d as i64 + 1), rules: vec![(RA, Rule::Offset(-8))] });
    }
    let m = modules.find(lookup).ok_or_else(|| format!("no unwind information for {lookup:#x}"))?;
    let svma = lookup.wrapping_sub(m.bias);
    let eh = EhFrame::new(&m.eh_frame, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(m.eh_frame_svma).set_text(m.text_svma);
    let fde = match &m.hdr {
        Some((hdr, hdr_svma)) => {
            bases = bases.set_eh_frame_hdr(*hdr_svma);
            let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8).map_err(|e| format!("{}: bad .eh_frame_hdr: {e}", m.name))?;
            match parsed.table() {
                Some(t) => t.fde_for_address(&eh, &bases, svma, EhFrame::cie_from_offset),
                None => eh.fde_for_address(&bases, svma, EhFrame::cie_from_offset),
            }
        }
        None => eh.fde_for_address(&bases, svma, EhFrame::cie_from_offset),
    }
    .map_err(|e| format!("no FDE for {lookup:#x} in {}: {e}", m.name))?;
    let row = fde.unwind_info_for_address(&eh, &bases, ctx, svma).map_err(|e| format!("bad CFI at {lookup:#x} in {}: {e}", m.name))?;
    let (cfa_reg, cfa_off) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => (register.0, *offset),
        CfaRule::Expression(_) => return Err(format!("CFA expression at {lookup:#x} in {}", m.name)),
    };
    let mut rules = Vec::new();
    for reg in [RBX, RBP, RA].into_iter().chain(R12..=R15) {
        let rule = match row.register(gimli::Register(reg as u16)).unwrap_or(RegisterRule::Undefined) {
            RegisterRule::Undefined => Rule::Undefined,
            RegisterRule::SameValue => Rule::Same,
            RegisterRule::Offset(o) => Rule::Offset(o),
            RegisterRule::ValOffset(o) => Rule::ValOffset(o),
            RegisterRule::Register(x) => Rule::Register(x.0),
            _ => Rule::Unsupported,
        };
        rules.push((reg, rule));
    }
    Ok(Row { cfa_reg, cfa_off, rules })
}

/// Go one frame up. Returns the CFA, or None at the outermost frame.
fn step(r: &mut [Option<u64>; 17], home: &mut [Home; 17], first: bool, modules: &Modules, mem: &dyn MemoryReader, ctx: &mut UnwindContext<usize>) -> Result<Option<u64>, String> {
    let pc = r[RA].ok_or("no program counter")?;
    let lookup = if first { pc } else { pc - 1 };
    let row = row_for(modules, lookup, ctx)?;
    let base = r.get(row.cfa_reg as usize).copied().flatten().ok_or_else(|| format!("CFA register {} unknown at {pc:#x}", row.cfa_reg))?;
    let cfa = (base as i64).wrapping_add(row.cfa_off) as u64;
    let old = *r;
    let old_home = *home;
    let read = |addr: u64| mem.read_u64(addr).map_err(|e| format!("cannot read stack at {addr:#x}: {e}"));
    for (reg, rule) in &row.rules {
        let reg = *reg;
        home[reg] = match *rule {
            Rule::Undefined | Rule::Same => old_home[reg],
            Rule::Offset(o) => Home::Memory((cfa as i64).wrapping_add(o) as u64),
            Rule::Register(x) => old_home.get(x as usize).copied().unwrap_or(Home::Unknown),
            Rule::ValOffset(_) | Rule::Unsupported => Home::Unknown,
        };
        r[reg] = match *rule {
            // An undefined return address marks the outermost frame (`_start`, the thread
            // entry in `clone`); other undefined registers keep their value.
            Rule::Undefined if reg == RA => return Ok(None),
            Rule::Undefined | Rule::Same => old[reg],
            Rule::Offset(o) => Some(read((cfa as i64).wrapping_add(o) as u64)?),
            Rule::ValOffset(o) => Some((cfa as i64).wrapping_add(o) as u64),
            Rule::Register(x) => old.get(x as usize).copied().flatten(),
            Rule::Unsupported if reg == RA => return Err(format!("return address expression at {pc:#x}")),
            Rule::Unsupported => None,
        };
    }
    r[RSP] = Some(cfa);
    home[RSP] = Home::Unknown;
    Ok(Some(cfa))
}

/// Error helper for callers that need an engine error.
pub fn incomplete_error(tid: i32, why: &str) -> Error {
    Error::Other(format!("thread {tid}: cannot unwind the stack: {why}"))
}
