//! Fixup: bind the new code's references to the live process and lay out the region image.
//!
//! Region layout (all live addresses):
//! ```text
//! base         header (magic, version, JSON: patch id, digest, entries with original bytes)
//! mirror_base  NEW's span [span.lo, span.lo+len) with the carried pieces at their offsets
//! tail         import stubs (jmp *[rip]; addr) and address slots (GOT entries OLD lacks),
//!              register thunks, library detours, and one gate per entry ([`crate::gate`])
//! control      one page, the only one the target may write: the gates' commit word
//! ```
use crate::arch::x86_64::{self, RefKind, STUB_LEN};
use crate::bundle::{Bundle, Target};
use crate::error::{Error, RefusalKind, Result};
use crate::process::{Mapping, MemoryReader};
use crate::ptrace::Stopped;
use crate::region::{CallRecord, CodeRange, Entry, GateRecord, Header, OldEntry, RegValue, SiteRecord};
use crate::target::{self, Executable};
use goblin::elf::{sym, Elf};
use std::collections::{BTreeMap, HashMap};

pub const PAGE: u64 = 4096;
/// Header bytes kept for the record of switched frames (about 100 bytes each).
pub const SWITCH_RECORD_ROOM: u64 = 32 * 1024;


pub fn page_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Where everything of one region goes. SVMA (NEW's file addresses) to AVMA (live) mapping of
/// the mirror is `mirror_base + (svma - span_lo)`; OLD's SVMAs map with `bias`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub base: u64,
    pub len: u64,
    pub header_len: u64,
    pub mirror_base: u64,
    pub span_lo: u64,
    pub span_len: u64,
    pub tail: u64,
    /// Load bias of the running executable.
    pub bias: u64,
    stubs: BTreeMap<String, u64>,
    slots: Vec<(Target, u64)>,
    /// Register-preserving entry thunks: function name -> (offset in the tail, bytes, saved
    /// general registers, saved xmm registers).
    thunks: BTreeMap<String, Thunk>,
    /// Offset in the tail of the library-variable detours (one `DETOUR_LEN` each, in order).
    detours_at: u64,
    /// Offset in the tail of the gates (one `GATE_ROOM` each, in the order of `gated`).
    gates_at: u64,
    gated: Vec<String>,
    /// Offset of the control page from `base`.
    control_off: u64,
}

#[derive(Debug, Clone)]
struct Thunk {
    offset: u64,
    len: u64,
    gprs: Vec<u8>,
    xmms: Vec<u8>,
    target_svma: u64,
}

impl Layout {
    /// Size the region for `bundle`; addresses are filled by [`Layout::place`].
    pub fn new(bundle: &Bundle, bias: u64) -> Layout {
        let m = &bundle.manifest;
        // Room for the entries, the return sites, and the frames switched (written later).
        let sites: u64 = m.functions.iter().map(|f| f.return_sites.iter().filter(|r| r.new.is_some()).count() as u64).sum();
        let header_len = page_up(16 + 4096 + 1024 * (m.functions.len() as u64 * 2) + 160 * sites + SWITCH_RECORD_ROOM);
        let mut stubs = BTreeMap::new();
        let mut slots: Vec<(Target, u64)> = Vec::new();
        for f in &m.fixups {
            match &f.target {
                Target::Import { name } => {
                    let n = stubs.len() as u64;
                    stubs.entry(name.clone()).or_insert(n * STUB_LEN as u64);
                }
                Target::Slot { of } => {
                    if !slots.iter().any(|(t, _)| t == of.as_ref()) {
                        slots.push((of.as_ref().clone(), 0));
                    }
                }
                _ => {}
            }
        }
        for d in &m.detours {
            let of = Target::Import { name: d.symbol.clone() };
            if !slots.iter().any(|(t, _)| *t == of) {
                slots.push((of, 0));
            }
        }
        let stub_bytes = stubs.len() as u64 * STUB_LEN as u64;
        for (i, s) in slots.iter_mut().enumerate() {
            s.1 = stub_bytes + i as u64 * 8;
        }
        let mut thunks = BTreeMap::new();
        let mut at = stub_bytes + slots.len() as u64 * 8;
        for f in m.functions.iter().filter(|f| !f.preserve.is_empty()) {
            // The bundle reader checked the names (caller-saved, xmm0-15 at most).
            let regs = crate::extract::regs::RegSet::from_names(&f.preserve).unwrap_or_default();
            let (gprs, xmms) = (regs.gprs(), regs.xmms());
            // Size with a dummy placement: the encoding's length does not depend on the distance.
            let len = x86_64::preserve_thunk(&gprs, &xmms, 0, 0).map(|b| b.len() as u64).unwrap_or(0);
            at = at.div_ceil(16) * 16;
            thunks.insert(f.name.clone(), Thunk { offset: at, len, gprs, xmms, target_svma: f.new_svma });
            at += len;
        }
        at = at.div_ceil(16) * 16;
        let detours_at = at;
        at += m.detours.len() as u64 * x86_64::DETOUR_LEN as u64;
        at = at.div_ceil(16) * 16;
        let gates_at = at;
        let gated: Vec<String> = m.functions.iter().filter(|f| f.has_entry_jump()).map(|f| f.name.clone()).collect();
        at += gated.len() as u64 * x86_64::gate::GATE_ROOM;
        let tail_len = page_up(at);
        let control_off = header_len + m.span.len + tail_len;
        Layout {
            base: 0,
            len: control_off + PAGE,
            header_len,
            mirror_base: 0,
            span_lo: m.span.lo,
            span_len: m.span.len,
            tail: 0,
            bias,
            stubs,
            slots,
            thunks,
            detours_at,
            gates_at,
            gated,
            control_off,
        }
    }

    /// Where the gate of function `name`'s entry goes.
    pub fn gate_at(&self, name: &str) -> Option<u64> {
        let i = self.gated.iter().position(|n| n == name)? as u64;
        Some(self.tail + self.gates_at + i * x86_64::gate::GATE_ROOM)
    }

    /// The control page (live address): the one page the target may write.
    pub fn control(&self) -> u64 {
        self.base + self.control_off
    }

    /// Where the jump at the old entry of `f` leads: its register thunk, else the new code.
    pub fn entry_target(&self, f: &crate::bundle::Function) -> u64 {
        match self.thunks.get(&f.name) {
            Some(t) => self.tail + t.offset,
            None => self.mirror(f.new_svma),
        }
    }

    /// Live ranges of the entry thunks (code of the patch that the stack check must guard).
    pub fn thunk_ranges(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.thunks.iter().map(|(n, t)| (n.as_str(), self.tail + t.offset, t.len))
    }

    pub fn place(&mut self, base: u64) {
        self.base = base;
        self.mirror_base = base + self.header_len;
        self.tail = self.mirror_base + self.span_len;
    }

    /// Live address of a NEW address carried in the mirror.
    pub fn mirror(&self, svma: u64) -> u64 {
        self.mirror_base + (svma - self.span_lo)
    }

    pub fn old(&self, svma: u64) -> u64 {
        svma.wrapping_add(self.bias)
    }

    pub fn imports(&self) -> impl Iterator<Item = &str> {
        self.stubs.keys().map(|s| s.as_str()).chain(self.slots.iter().filter_map(|(t, _)| match t {
            Target::Import { name } => Some(name.as_str()),
            _ => None,
        }))
    }
}

/// Build the region image (without its header) for a placed layout.
/// `imports` maps each dynamic symbol to its live address.
pub fn build_image(bundle: &Bundle, l: &Layout, imports: &HashMap<String, u64>) -> Result<Vec<u8>> {
    let mut img = vec![0u8; l.len as usize];
    let off = |avma: u64| (avma - l.base) as usize;
    // Until the switch, a gate whose tool is gone lets its thread run the old code.
    let control = x86_64::gate::control_page(x86_64::gate::OLD);
    img[l.control_off as usize..][..control.len()].copy_from_slice(&control);
    for p in &bundle.manifest.pieces {
        let at = off(l.mirror(p.svma));
        img[at..at + p.len as usize].copy_from_slice(bundle.piece_bytes(p));
    }
    let import = |name: &str| imports.get(name).copied().ok_or_else(|| Error::Other(format!("symbol `{name}` was not resolved")));
    for (name, o) in &l.stubs {
        let at = off(l.tail) + *o as usize;
        img[at..at + STUB_LEN].copy_from_slice(&x86_64::import_stub(import(name)?));
    }
    for (t, o) in &l.slots {
        let v = match t {
            Target::Import { name } => import(name)?,
            t => live_target(t, l, imports)?,
        };
        let at = off(l.tail) + *o as usize;
        img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    for t in l.thunks.values() {
        let at = l.tail + t.offset;
        let code = x86_64::preserve_thunk(&t.gprs, &t.xmms, at, l.mirror(t.target_svma))
            .ok_or_else(|| Error::Other(format!("register thunk at {at:#x} cannot reach its function")))?;
        let o = off(at);
        img[o..o + code.len()].copy_from_slice(&code);
    }
    for (i, d) in bundle.manifest.detours.iter().enumerate() {
        let stub = l.tail + l.detours_at + (i * x86_64::DETOUR_LEN) as u64;
        let slot = live_target(&Target::Slot { of: Box::new(Target::Import { name: d.symbol.clone() }) }, l, imports)?;
        let ip = l.mirror(d.at);
        let o = off(ip);
        let len = d.len as usize;
        let insn = img.get(o..o + len).ok_or_else(|| Error::Bundle(format!("detour at {:#x} lies outside the image", d.at)))?.to_vec();
        let code = x86_64::library_detour(&insn, ip, stub, slot, d.offset)
            .ok_or_else(|| Error::Bundle(format!("the instruction at {:#x} that uses `{}` cannot be moved to a detour", d.at, d.symbol)))?;
        let so = off(stub);
        img[so..so + code.len()].copy_from_slice(&code);
        let jmp = x86_64::jmp_rel32(ip, stub).ok_or_else(|| Error::Other("detour out of reach".into()))?;
        img[o..o + x86_64::JUMP_LEN].copy_from_slice(&jmp);
        img[o + x86_64::JUMP_LEN..o + len].fill(0x90);
    }
    for f in &bundle.manifest.fixups {
        let t = live_target(&f.target, l, imports)?.wrapping_add(f.addend as u64);
        let field = l.mirror(f.at);
        let at = off(field);
        let range = |what: &str| Error::Other(format!("fixup at {field:#x} ({what}) cannot reach {t:#x} ({:?}); the region is too far from the code", f.target));
        match f.kind {
            RefKind::PcRel => {
                let d = t as i128 - l.mirror(f.next_ip) as i128;
                let d = i32::try_from(d).map_err(|_| range("pc-relative"))?;
                img[at..at + 4].copy_from_slice(&d.to_le_bytes());
            }
            RefKind::PcRel8 => {
                let d = t as i128 - l.mirror(f.next_ip) as i128;
                let d = i8::try_from(d).map_err(|_| range("short branch"))?;
                img[at] = d as u8;
            }
            RefKind::Abs32 => {
                let v = u32::try_from(t).map_err(|_| range("absolute 32-bit"))?;
                img[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            RefKind::Abs32S => {
                let v = i32::try_from(t as i64).map_err(|_| range("absolute signed 32-bit"))?;
                img[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            RefKind::Abs64 => img[at..at + 8].copy_from_slice(&t.to_le_bytes()),
            RefKind::TpOff32 => {
                let v = i32::try_from(t as i64).map_err(|_| range("thread-pointer offset"))?;
                img[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(img)
}

fn live_target(t: &Target, l: &Layout, _imports: &HashMap<String, u64>) -> Result<u64> {
    Ok(match t {
        Target::Old { svma, .. } => l.old(*svma),
        Target::Mirror { svma } => l.mirror(*svma),
        // Calls reach an import through its stub; a slot holds the symbol itself.
        Target::Import { name } => l.tail + *l.stubs.get(name).ok_or_else(|| Error::Other(format!("no stub for {name}")))?,
        Target::Slot { of } => {
            let o = l.slots.iter().find(|(t, _)| t == of.as_ref()).map(|(_, o)| *o).ok_or_else(|| Error::Other("no slot".into()))?;
            l.tail + o
        }
        Target::TpOff { value, .. } => *value as u64,
    })
}

/// A dynamic symbol found in a loaded library.
#[derive(Debug, Clone, Copy)]
pub struct LiveSymbol {
    pub addr: u64,
    /// A GNU indirect function: `addr` is its resolver, to be called for the real address.
    pub ifunc: bool,
}

/// Look up dynamic symbols in the shared objects mapped by a process.
pub fn find_live_symbol(pid: i32, maps: &[Mapping], exe_inode: u64, name: &str) -> Option<LiveSymbol> {
    let mut seen = Vec::new();
    for m in maps {
        if m.inode == 0 || m.inode == exe_inode || m.offset != 0 || m.path.is_empty() || seen.contains(&m.inode) || m.path.starts_with("/memfd:") {
            continue;
        }
        seen.push(m.inode);
        let file = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        let data = std::fs::read(&file).or_else(|_| std::fs::read(format!("/proc/{pid}/root{}", m.path))).ok()?;
        let Ok(elf) = Elf::parse(&data) else { continue };
        let first = elf.program_headers.iter().filter(|p| p.p_type == goblin::elf::program_header::PT_LOAD).map(|p| p.p_vaddr).min().unwrap_or(0) & !0xfff;
        let bias = m.start.wrapping_sub(first);
        for (i, s) in elf.dynsyms.iter().enumerate() {
            if s.st_shndx == 0 || s.st_value == 0 || elf.dynstrtab.get_at(s.st_name) != Some(name) {
                continue;
            }
            if !matches!(s.st_bind(), sym::STB_GLOBAL | sym::STB_WEAK) {
                continue;
            }
            if elf.versym.as_ref().and_then(|v| v.get_at(i)).is_some_and(|v| v.is_hidden()) {
                continue; // an old compatibility version, not the default one
            }
            return Some(LiveSymbol { addr: bias.wrapping_add(s.st_value), ifunc: s.st_type() == sym::STT_GNU_IFUNC });
        }
    }
    None
}

/// The region's contents for the place its layout was given: the header (the target's own
/// record of the patch) followed by the new code with every reference bound to the process.
pub struct Image {
    pub bytes: Vec<u8>,
    pub header: Header,
}

/// Fix up `bundle` for the region placed by `layout` in `target`: bind imports (asking IFUNC
/// resolvers in the target), build the image, and write the header into it.
pub fn fixup(target: &target::Target, exe: &Executable, bundle: &Bundle, entries: &[OldEntry], layout: &Layout) -> Result<Image> {
    let imports = resolve_imports(target, exe.inode, layout)?;
    let mut bytes = build_image(bundle, layout, &imports)?;
    let mut header = header(target, exe, bundle, entries, layout, &bytes)?;
    match gates(target, bundle, entries, layout, &mut bytes) {
        Ok(g) => header.gates = g,
        Err(why) => {
            tracing::warn!(pid = target.pid, "no gates for this patch, its jumps are written one after the other: {why}");
            header.ungated = Some(why);
        }
    }
    let enc = header.encode();
    if enc.len() as u64 > layout.header_len {
        return Err(Error::Other("patch region header does not fit its reserved space".into()));
    }
    bytes[..enc.len()].copy_from_slice(&enc);
    Ok(Image { bytes, header })
}

/// One gate per entry, written into `image` (see [`crate::gate`]); why not, when an entry
/// cannot have one.
fn gates(target: &target::Target, bundle: &Bundle, entries: &[OldEntry], layout: &Layout, image: &mut [u8]) -> std::result::Result<Vec<GateRecord>, String> {
    use x86_64::gate::{displaced_len, gate, GATE_ROOM};
    let mut out = Vec::new();
    for e in entries {
        let f = bundle.manifest.functions.iter().find(|f| f.name == e.function).ok_or_else(|| format!("entry of unknown function `{}`", e.function))?;
        if e.short || f.trampoline.is_some() {
            return Err(format!("`{}` is shorter than a jump (its entry jumps through a trampoline)", f.name));
        }
        // The old function as it runs, with its original first bytes (what a branch in it sees).
        let mut function = target.mem.read_vec(e.at, f.old_size as usize).map_err(|e| e.to_string())?;
        let n = function.len().min(e.original.len());
        function[..n].copy_from_slice(&e.original[..n]);
        // What the entry holds now (an earlier patch's jump, or the original), then the rest.
        let mut code = e.current.clone();
        code.extend_from_slice(function.get(e.current.len()..(e.current.len() + 16).min(function.len())).unwrap_or_default());
        let why = |u: x86_64::gate::Ungateable| format!("the entry of `{}` cannot have a gate: {u}", f.name);
        let len = displaced_len(&code, e.at, x86_64::JUMP_LEN, &function).map_err(why)?;
        let at = layout.gate_at(&f.name).ok_or_else(|| format!("no room for the gate of `{}`", f.name))?;
        let g = gate(at, e.at, &code[..len], layout.entry_target(f), layout.control()).map_err(why)?;
        if g.bytes.len() as u64 > GATE_ROOM {
            return Err(format!("the gate of `{}` does not fit its room", f.name));
        }
        let o = (at - layout.base) as usize;
        image[o..o + g.bytes.len()].copy_from_slice(&g.bytes);
        out.push(GateRecord { name: f.name.clone(), entry: e.at, at, len: g.bytes.len() as u64, decided: g.decided, old_path: g.old_path, depths: g.depths });
    }
    Ok(out)
}

/// The header: entries with their jumps' targets, the code the region carries, and the return
/// sites with the constants a switched frame gets (read from the fixed-up image, and for a
/// switch back from the old code in the process).
fn header(target: &target::Target, exe: &Executable, bundle: &Bundle, entries: &[OldEntry], layout: &Layout, image: &[u8]) -> Result<Header> {
    let m = &bundle.manifest;
    let live = target.live();
    let function = |name: &str| m.functions.iter().find(|f| f.name == name).ok_or_else(|| Error::Bundle(format!("entry of unknown function `{name}`")));
    let mut out_entries = Vec::new();
    for e in entries {
        let f = function(&e.function)?;
        let entry = Entry {
            name: f.name.clone(),
            entry: e.at,
            // A short entry jumps to its trampoline, which jumps to the new code.
            target: match (e.short, f.trampoline) {
                (true, Some(t)) => exe.avma(t)?,
                _ => layout.entry_target(f),
            },
            original: hex::encode(&e.original),
            previous: hex::encode(&e.current),
            old_start: exe.avma(f.old_svma.unwrap_or(0))?,
            old_len: f.old_size,
            short: e.short,
        };
        if entry.jump().is_none() {
            return Err(Error::Other(format!("`{}`: new code out of jump range", entry.name)));
        }
        out_entries.push(entry);
    }
    let in_image = |svma: u64| {
        let ip = layout.mirror(svma);
        let off = ip.checked_sub(layout.base)? as usize;
        crate::arch::x86_64::constant_of(image.get(off..(off + 15).min(image.len()))?, ip)
    };
    let in_old = |svma: u64| {
        let ip = svma.checked_add(exe.bias)?;
        crate::arch::x86_64::constant_of(&target.mem.read_vec(ip, 15).ok()?, ip)
    };
    let values = |sets: &[crate::bundle::RegFromCode], at: &dyn Fn(u64) -> Option<u64>| -> Option<Vec<RegValue>> {
        sets.iter().map(|s| Some(RegValue { reg: s.reg, value: at(s.at)? })).collect()
    };
    let return_sites = m
        .functions
        .iter()
        .filter(|f| f.has_entry_jump())
        .flat_map(|f| f.return_sites.iter().map(move |r| (f, r)))
        .filter_map(|(f, r)| {
            // A site whose constants cannot be read is simply not switchable.
            let sets = values(&r.sets, &in_image)?;
            let back_sets = if r.back { values(&r.back_sets, &in_old) } else { None };
            Some(SiteRecord {
                name: f.name.clone(),
                old: r.old.checked_add(exe.bias)?,
                new: layout.mirror(r.new?),
                back: back_sets.is_some(),
                sets,
                moves: r.moves.clone(),
                back_moves: if back_sets.is_some() { r.back_moves.clone() } else { Vec::new() },
                cfa_above_sp: r.cfa_above_sp,
                back_sets: back_sets.unwrap_or_default(),
            })
        })
        .collect();
    Ok(Header {
        patch_id: bundle.patch_id(),
        bundle_sha256: bundle.digest.clone(),
        build_id: m.target.build_id.clone(),
        applied_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        seq: live.iter().map(|a| a.header.seq).max().unwrap_or(0) + 1,
        base: layout.base,
        len: layout.len,
        entries: out_entries,
        code: m
            .functions
            .iter()
            .map(|f| CodeRange { name: f.name.clone(), start: layout.mirror(f.new_svma), len: f.new_size })
            .chain(layout.thunk_ranges().map(|(n, start, len)| CodeRange { name: n.to_string(), start, len }))
            .collect(),
        return_sites,
        calls: call_records(target, exe, bundle, layout)?,
        switched: Vec::new(),
        switched_unrecorded: 0,
        gates: Vec::new(),
        control: layout.control(),
        ungated: None,
        library: exe.library.clone(),
    })
}

/// The direct calls to retarget after the switch: each field's bytes now and before any patch.
fn call_records(target: &target::Target, exe: &Executable, bundle: &Bundle, layout: &Layout) -> Result<Vec<CallRecord>> {
    let live = target.live();
    let mut out = Vec::new();
    for f in bundle.manifest.functions.iter().filter(|f| f.has_entry_jump()) {
        for field in &f.call_sites {
            let at = exe.avma(*field)?;
            let previous = target.mem.read_vec(at, 4)?;
            let original = live.iter().find_map(|a| a.header.calls.iter().find(|c| c.at == at).map(|c| c.original.clone())).unwrap_or_else(|| hex::encode(&previous));
            let record = CallRecord { name: f.name.clone(), at, target: layout.entry_target(f), original, previous: hex::encode(&previous) };
            // Out of a rel32's reach, the entry jump keeps serving this call.
            if record.written().is_some() {
                out.push(record);
            }
        }
    }
    Ok(out)
}

/// Live addresses of the dynamic symbols the new code needs and OLD never linked.
fn resolve_imports(target: &target::Target, exe_ino: u64, layout: &Layout) -> Result<HashMap<String, u64>> {
    let pid = target.pid;
    let mut out = HashMap::new();
    for name in layout.imports() {
        if out.contains_key(name) {
            continue;
        }
        let s = find_live_symbol(pid, &target.maps, exe_ino, name).ok_or_else(|| {
            Error::refused_kind(RefusalKind::MissingSymbol, format!("the new code calls `{name}`, which no library loaded in process {pid} defines"))
        })?;
        let addr = if s.ifunc {
            // An indirect function: ask its resolver, in the target, for the implementation.
            let mut t = Stopped::one(&target.proc, pid, std::time::Duration::from_secs(5))?;
            let a = t.call(pid, target.gadgets, s.addr, [0; 6])?;
            drop(t);
            if a == 0 || target.mem.read_vec(a, 1).is_err() {
                return Err(Error::Process { pid, msg: format!("resolver of `{name}` returned {a:#x}") });
            }
            a
        } else {
            s.addr
        };
        out.insert(name.to_string(), addr);
    }
    Ok(out)
}
