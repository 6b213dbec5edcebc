//! Frames that never return: which frames of an old function, stopped at the return address
//! of one of its calls, the new function can take over.
//!
//! A return site R of OLD (the address after a call) is matched with R' in NEW: the call to
//! the same callee with the same ordinal among the calls to it, at the same loop depth. The
//! frame must be the same at both (the CFI rows at and just before R and R': CFA rule and where
//! the callee-saved registers are kept), and every location NEW reads after R' before writing
//! it (live at R', through loop back-edges, until the frame returns) must hold at R in OLD a
//! value defined the same way: by instructions that the alignment of OLD with NEW pairs, whose
//! own inputs are defined the same way in turn (co-inductively around loops), or the value the
//! function was entered with. Anything not provable is a refusal naming the location; never a
//! guess. The same proof from NEW to OLD makes the site reversible.
//!
//! What "the same value" rests on: memory that is not the frame (globals, heap) is shared state
//! both versions see; a call's result is what the same callee returned for arguments defined
//! the same way (for the call a frame is stopped in, what the callee will return, since that
//! call already happened); decisions old code already took stay taken, as for any update that
//! lands between two instructions.
use super::{fingerprint::describe, refs::{function_refs, relative_jump_table}};
use crate::bundle::{Move, Place, RegFromCode, ReturnSite};
use super::regs::{Clobbers, RegSet};
use crate::elf::{ElfFile, SymKind, Symbol};
use crate::unwind::Modules;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfo, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Every return site of `of` (in OLD) and what becomes of a frame stopped there.
pub fn return_sites(old: &ElfFile, of: &Symbol, new: &ElfFile, nf: &Symbol) -> Vec<ReturnSite> {
    let mut keys = HashMap::new();
    let (o, n) = match (Func::decode(old, of, &mut keys), Func::decode(new, nf, &mut keys)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(why), _) | (_, Err(why)) => return o_sites(old, of).into_iter().map(|r| refused(r, why.clone())).collect(),
    };
    let (ocfi, ncfi) = (Modules::of_file(old), Modules::of_file(new));
    let Some(pairs) = align(&o, &n) else {
        return o.calls().map(|i| refused(o.insns[i].next_ip, "the function is too large to align old and new code".into())).collect();
    };
    let back_pairs = invert(&pairs, n.insns.len());
    let shapes = align_by(&o, &n, |x| x.shape).map(|p| fill_gaps(&o, &n, p)).unwrap_or_else(|| vec![None; o.insns.len()]);
    let back_shapes = invert(&shapes, n.insns.len());
    let mut out = Vec::new();
    for i in o.calls() {
        let r = o.insns[i].next_ip;
        if i + 1 >= o.insns.len() {
            continue; // a call that never returns ends the function: no frame stands there
        }
        let site = match match_call(&o, i, &n, &pairs) {
            Err(why) => refused(r, why),
            Ok(j) => match same_frame(ocfi.as_ref(), &o, i, ncfi.as_ref(), &n, j) {
                Err(why) => refused(r, why),
                Ok(()) => match Proof::new(&n, &o, &back_pairs, &back_shapes).live_values_match(j, i) {
                    Err(why) => refused(r, why),
                    Ok(there) => {
                        let back = Proof::new(&o, &n, &pairs, &shapes).live_values_match(i, j).ok();
                        ReturnSite {
                            old: r,
                            new: Some(n.insns[j].next_ip),
                            back: back.is_some(),
                            sets: there.sets,
                            moves: there.moves,
                            back_sets: back.as_ref().map(|b| b.sets.clone()).unwrap_or_default(),
                            back_moves: back.map(|b| b.moves).unwrap_or_default(),
                            cfa_above_sp: -o.insns[i + 1].rsp.unwrap_or(0),
                            why: None,
                        }
                    }
                },
            },
        };
        out.push(site);
    }
    out
}

fn refused(old: u64, why: String) -> ReturnSite {
    ReturnSite { old, new: None, back: false, sets: Vec::new(), moves: Vec::new(), back_sets: Vec::new(), back_moves: Vec::new(), cfa_above_sp: 0, why: Some(why) }
}

/// Return addresses of the direct calls of `f`, for refusing them all at once.
fn o_sites(elf: &ElfFile, f: &Symbol) -> Vec<u64> {
    let code = elf.read(f.addr, f.size as usize).unwrap_or(&[]);
    let mut d = Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for insn in &mut d {
        if matches!(insn.flow_control(), FlowControl::Call | FlowControl::IndirectCall) && insn.next_ip() < f.end() {
            out.push(insn.next_ip());
        }
    }
    out
}

/// A location a function keeps a value in: a register (iced's full register), the flags, a
/// slot of its frame (offset from the CFA, width), or stack memory it cannot place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Loc {
    Reg(Register),
    Flags,
    Slot(i64, u32),
    AnySlot,
}

impl Loc {
    fn overlaps(self, o: Loc) -> bool {
        match (self, o) {
            (Loc::Slot(a, aw), Loc::Slot(b, bw)) => a < b + bw as i64 && b < a + aw as i64,
            (Loc::AnySlot, Loc::Slot(..)) | (Loc::Slot(..), Loc::AnySlot) | (Loc::AnySlot, Loc::AnySlot) => true,
            (a, b) => a == b,
        }
    }

    fn covers(self, o: Loc) -> bool {
        match (self, o) {
            (Loc::Slot(a, aw), Loc::Slot(b, bw)) => a <= b && b + bw as i64 <= a + aw as i64,
            (Loc::AnySlot, _) => false,
            (a, b) => a == b,
        }
    }

    fn show(self) -> String {
        match self {
            Loc::Reg(r) => format!("{r:?}").to_lowercase(),
            Loc::Flags => "the flags".into(),
            Loc::Slot(o, w) => format!("the {w}-byte stack slot at CFA{o:+}"),
            Loc::AnySlot => "stack memory at an untracked address".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Def {
    loc: Loc,
    /// The old value may survive (a partial or conditional write, a callee that may not write).
    partial: bool,
    /// A callee's scratch register after the call: no correct code reads the value, so any
    /// two are as good.
    scratch: bool,
}

#[derive(Debug, Clone)]
struct Insn {
    ip: u64,
    next_ip: u64,
    call: bool,
    /// What the instruction is, independent of where the function was placed.
    key: u32,
    /// The same without its registers and frame offsets: what it computes, for pairing
    /// instructions of two register allocations.
    shape: u32,
    /// Its explicit operands, in order, as locations.
    ops: Vec<Operand>,
    uses: Vec<Loc>,
    defs: Vec<Def>,
    succ: Vec<usize>,
    /// Leaves the function: a return, or a jump to other code.
    exit: Option<Exit>,
    /// Puts a constant in a register and reads nothing else: an address taken rip-relative
    /// (`lea sym(%rip), %r13`) or an immediate. Such a value, hoisted out of a loop, can be
    /// put into a switched frame.
    constant: bool,
    /// Offsets of %rsp and of a frame-pointer %rbp from the CFA when known.
    rsp: Option<i64>,
    rbp: Option<i64>,
}

/// An explicit operand: a register, a memory operand (the registers its address reads, or the
/// frame slot it is), or something else (an immediate, a branch target, the stack pointer).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Operand {
    Reg { loc: Loc, read: bool, write: bool },
    Mem { address: Vec<Loc>, slot: Option<Loc>, read: bool, write: bool },
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Return,
    TailJump,
}

const CALLEE_SAVED: [Register; 6] = [Register::RBX, Register::RBP, Register::R12, Register::R13, Register::R14, Register::R15];
const ARGS: [Register; 7] = [Register::RDI, Register::RSI, Register::RDX, Register::RCX, Register::R8, Register::R9, Register::RAX];
const CALLER_SAVED_GPR: [Register; 9] =
    [Register::RAX, Register::RCX, Register::RDX, Register::RSI, Register::RDI, Register::R8, Register::R9, Register::R10, Register::R11];
const RESULTS: [Register; 4] = [Register::RAX, Register::RDX, Register::XMM0, Register::XMM1];

/// Vector register `n` as a location: its low 128 bits (xmm). Scalar and 128-bit code never
/// gives the upper halves a meaning, and the ABI clobbers them across calls.
fn xmm(n: u32) -> Register {
    // XMM0..XMM31 are consecutive in iced's numbering.
    Register::try_from(Register::XMM0 as usize + n as usize).unwrap_or(Register::XMM0)
}

/// The location a register operand names: the full general register, or the xmm of a vector.
fn location_of(r: Register) -> Register {
    if r.is_vector_register() && r.number() < 32 {
        xmm(r.number() as u32)
    } else {
        r.full_register()
    }
}

/// Caller-saved registers a call may change.
#[derive(Clone, Copy)]
struct Clobbered(RegSet);

impl Clobbered {
    fn contains(self, r: Register) -> bool {
        let bit = if r.is_gpr64() {
            r as u32 - Register::RAX as u32
        } else if r.is_xmm() {
            16 + (r as u32 - Register::XMM0 as u32)
        } else {
            return true;
        };
        self.0 .0 & (1 << bit) != 0
    }
}

struct Func<'a> {
    name: &'a str,
    insns: Vec<Insn>,
    preds: Vec<Vec<usize>>,
    /// Loop depth of each instruction (backward branches around it).
    depth: Vec<u32>,
    /// CFA offsets of the frame objects whose address leaves the function (`None`: an address
    /// of the frame escapes in a way not placed).
    escaped: Option<BTreeSet<i64>>,
}

/// Interned instruction keys shared by the two sides of one comparison.
fn intern(keys: &mut HashMap<String, u32>, k: String) -> u32 {
    let n = keys.len() as u32;
    *keys.entry(k).or_insert(n)
}

impl<'a> Func<'a> {
    fn decode(elf: &'a ElfFile, f: &'a Symbol, keys: &mut HashMap<String, u32>) -> Result<Func<'a>, String> {
        let code = elf.read(f.addr, f.size as usize).ok_or_else(|| format!("`{}` has no bytes in {}", f.name, elf.path.display()))?;
        let refs = function_refs(elf, f).map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        for insn in Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE) {
            if insn.is_invalid() {
                return Err(format!("undecodable instruction at {:#x} in `{}`", insn.ip(), f.name));
            }
            raw.push(insn);
        }
        let index: HashMap<u64, usize> = raw.iter().enumerate().map(|(i, x)| (x.ip(), i)).collect();
        // Targets of the function's jump tables: successors of its indirect jumps.
        let mut table_targets = BTreeSet::new();
        for r in &refs {
            if r.jump_table {
                let mut k = 0;
                while let Some(w) = elf.read(r.target + 8 * k, 8) {
                    let t = u64::from_le_bytes(w.try_into().unwrap());
                    if !f.contains(t) || k > 4096 {
                        break;
                    }
                    table_targets.insert(t);
                    k += 1;
                }
            } else if elf.pie && (r.is_lea || r.is_mem) && !r.is_branch {
                if let Some(ts) = relative_jump_table(elf, f, r.target) {
                    table_targets.extend(ts.into_iter().map(|o| f.addr + o));
                }
            }
        }
        let mut succ = vec![Vec::new(); raw.len()];
        let mut exit = vec![None; raw.len()];
        for (i, x) in raw.iter().enumerate() {
            let next = (i + 1 < raw.len()).then_some(i + 1);
            let target = || index.get(&x.near_branch_target()).copied();
            match x.flow_control() {
                FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall | FlowControl::XbeginXabortXend | FlowControl::Interrupt => {
                    succ[i].extend(next)
                }
                FlowControl::ConditionalBranch => {
                    succ[i].extend(next);
                    match target() {
                        Some(t) => succ[i].push(t),
                        None => exit[i] = Some(Exit::TailJump),
                    }
                }
                FlowControl::UnconditionalBranch => match target() {
                    Some(t) => succ[i].push(t),
                    None => exit[i] = Some(Exit::TailJump),
                },
                FlowControl::IndirectBranch => {
                    if table_targets.is_empty() {
                        // `jmp *%rax` without a table we know: a tail call through a pointer.
                        exit[i] = Some(Exit::TailJump);
                    } else {
                        succ[i].extend(table_targets.iter().filter_map(|t| index.get(t)));
                    }
                }
                FlowControl::Return => exit[i] = Some(Exit::Return),
                FlowControl::Exception => {}
            }
        }
        let mut preds = vec![Vec::new(); raw.len()];
        for (i, s) in succ.iter().enumerate() {
            for &t in s {
                preds[t].push(i);
            }
        }
        let frame = stack_offsets(&raw, &succ);
        let escaped = escaped_offsets(&raw, &frame);
        let mut depth = vec![0u32; raw.len()];
        for (b, s) in succ.iter().enumerate() {
            for &t in s.iter().filter(|t| **t <= b) {
                for d in &mut depth[t..=b] {
                    *d += 1;
                }
            }
        }
        let mut by_ip: HashMap<u64, Vec<&crate::arch::x86_64::CodeRef>> = HashMap::new();
        for r in &refs {
            by_ip.entry(r.ip).or_default().push(r);
        }
        let mut factory = InstructionInfoFactory::new();
        let mut clob = Clobbers::new(elf);
        let mut insns = Vec::with_capacity(raw.len());
        for (i, x) in raw.iter().enumerate() {
            let (rsp, rbp) = frame[i];
            let clobbered = match x.flow_control() {
                FlowControl::Call => match elf.symbol_at(x.near_branch_target()).filter(|s| s.kind == SymKind::Func && s.addr == x.near_branch_target()) {
                    Some(callee) if elf.plt_entry(callee.addr).is_none() => Clobbered(clob.of(callee)),
                    _ => Clobbered(RegSet::CALLER_SAVED),
                },
                _ => Clobbered(RegSet::CALLER_SAVED),
            };
            let info = factory.info(x);
            let (uses, defs) = locations(info, x, rsp, rbp, clobbered);
            let off = (x.ip() - f.addr) as usize;
            let mut bytes = code[off..off + x.len()].to_vec();
            let mut what = Vec::new();
            for r in by_ip.get(&x.ip()).map(|v| v.as_slice()).unwrap_or(&[]) {
                let s = r.field_off - off;
                let e = (s + r.field_size as usize).min(bytes.len());
                bytes[s..e].fill(0);
                let d = describe(elf, f, r);
                // Branches inside the function: where to is the control-flow graph's business.
                what.push(if d.starts_with("self+") && r.is_branch { "self".to_string() } else { d });
            }
            let key = format!("{}|{}|{uses:?}|{defs:?}", hex::encode(&bytes), what.join(","));
            let key = intern(keys, key);
            let ops = operands(info, x, rsp, rbp);
            let shape = intern(keys, shape_of(x, &ops, &uses, &defs, &what));
            insns.push(Insn {
                ip: x.ip(),
                next_ip: x.next_ip(),
                call: matches!(x.flow_control(), FlowControl::Call | FlowControl::IndirectCall),
                constant: x.op_count() == 2
                    && x.op_kind(0) == OpKind::Register
                    && ((x.mnemonic() == Mnemonic::Lea && x.is_ip_rel_memory_operand())
                        || (x.mnemonic() == Mnemonic::Mov && matches!(x.op_kind(1), OpKind::Immediate32 | OpKind::Immediate64 | OpKind::Immediate32to64))),
                key,
                shape,
                ops,
                uses,
                defs,
                succ: succ[i].clone(),
                exit: exit[i],
                rsp,
                rbp,
            });
        }
        // %al counts the vector registers of a variadic call, and GCC sets it in the call's
        // block; a call whose block does not set %rax does not read it.
        for c in 0..insns.len() {
            if !insns[c].call {
                continue;
            }
            let mut k = c;
            let mut sets_rax = false;
            while k > 0 && preds[k] == [k - 1] && insns[k - 1].succ == [k] && !insns[k - 1].call {
                k -= 1;
                if insns[k].defs.iter().any(|d| d.loc == Loc::Reg(Register::RAX)) {
                    sets_rax = true;
                    break;
                }
            }
            if !sets_rax {
                insns[c].uses.retain(|u| *u != Loc::Reg(Register::RAX));
            }
        }
        Ok(Func { name: &f.name, insns, preds, depth, escaped })
    }

    fn calls(&self) -> impl Iterator<Item = usize> + '_ {
        self.insns.iter().enumerate().filter(|(_, x)| x.call).map(|(i, _)| i)
    }

    fn at(&self, point: usize) -> String {
        match self.insns.get(point) {
            Some(x) => format!("{:#x}", x.ip),
            None => "the end".into(),
        }
    }
}

/// Offsets of %rsp and of %rbp (when it is a frame pointer) from the CFA before each
/// instruction, by forward data flow from the entry (where %rsp = CFA - 8).
fn stack_offsets(raw: &[Instruction], succ: &[Vec<usize>]) -> Vec<(Option<i64>, Option<i64>)> {
    type State = (Option<i64>, Option<i64>);
    let mut at: Vec<Option<State>> = vec![None; raw.len()];
    if raw.is_empty() {
        return Vec::new();
    }
    at[0] = Some((Some(-8), None));
    let mut factory = InstructionInfoFactory::new();
    let writes: Vec<(bool, bool)> = raw
        .iter()
        .map(|x| {
            let info = factory.info(x);
            let w = |r: Register| {
                info.used_registers().iter().any(|u| u.register().full_register() == r && matches!(u.access(), OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite))
            };
            (w(Register::RSP), w(Register::RBP))
        })
        .collect();
    let mut work = vec![0usize];
    while let Some(i) = work.pop() {
        let (rsp, rbp) = at[i].unwrap();
        let out = transfer(&raw[i], writes[i], rsp, rbp);
        for &s in &succ[i] {
            let merged = match at[s] {
                None => out,
                Some((a, b)) => ((a == out.0).then_some(a).flatten(), (b == out.1).then_some(b).flatten()),
            };
            if at[s] != Some(merged) {
                at[s] = Some(merged);
                work.push(s);
            }
        }
    }
    at.into_iter().map(|s| s.unwrap_or((None, None))).collect()
}

fn transfer(x: &Instruction, (writes_rsp, writes_rbp): (bool, bool), rsp: Option<i64>, rbp: Option<i64>) -> (Option<i64>, Option<i64>) {
    let imm = (x.op_count() > 1 && matches!(x.op_kind(1), OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate8 | OpKind::Immediate32)).then(|| x.immediate(1) as i64);
    // Anything else that writes %rbp makes it an ordinary register.
    let rbp_after = if writes_rbp { None } else { rbp };
    match x.mnemonic() {
        // The callee pops what the call pushes and keeps %rbp.
        Mnemonic::Call => (rsp, rbp),
        Mnemonic::Leave => (rbp.map(|b| b + 8), None),
        Mnemonic::Sub if is_reg(x, 0, Register::RSP) => (rsp.zip(imm).map(|(s, i)| s - i), rbp),
        Mnemonic::Add if is_reg(x, 0, Register::RSP) => (rsp.zip(imm).map(|(s, i)| s + i), rbp),
        Mnemonic::Mov if is_reg(x, 0, Register::RBP) && is_reg(x, 1, Register::RSP) => (rsp, rsp),
        Mnemonic::Mov if is_reg(x, 0, Register::RSP) && is_reg(x, 1, Register::RBP) => (rbp, rbp),
        Mnemonic::Lea if is_reg(x, 0, Register::RSP) && x.memory_index() == Register::None => {
            let base = match x.memory_base() {
                Register::RSP => rsp,
                Register::RBP => rbp,
                _ => None,
            };
            (base.map(|b| b + x.memory_displacement64() as i64), rbp)
        }
        _ if x.is_stack_instruction() => (rsp.map(|s| s + x.stack_pointer_increment() as i64), rbp_after),
        _ if writes_rsp => (None, rbp_after),
        _ => (rsp, rbp_after),
    }
}

fn is_reg(x: &Instruction, op: u32, r: Register) -> bool {
    op < x.op_count() && x.op_kind(op) == OpKind::Register && x.op_register(op).full_register() == r
}

/// Where the frame objects whose address leaves the function start (CFA offsets): `lea` of
/// a frame address into another register. `None` when a frame address escapes otherwise
/// (`mov %rsp, %rdi`, `push %rsp`, a `lea` at an untracked stack offset).
fn escaped_offsets(raw: &[Instruction], frame: &[(Option<i64>, Option<i64>)]) -> Option<BTreeSet<i64>> {
    let mut out = BTreeSet::new();
    for (x, (rsp, rbp)) in raw.iter().zip(frame) {
        let frame_reg = |r: Register| r == Register::RSP || (rbp.is_some() && r == Register::RBP);
        if x.mnemonic() == Mnemonic::Lea && frame_reg(x.memory_base()) && !is_reg(x, 0, Register::RSP) && !is_reg(x, 0, Register::RBP) {
            let base = if x.memory_base() == Register::RSP { *rsp } else { *rbp };
            out.insert(base? + x.memory_displacement64() as i64);
            continue;
        }
        let adjusts = matches!(x.mnemonic(), Mnemonic::Sub | Mnemonic::Add | Mnemonic::And) && is_reg(x, 0, Register::RSP)
            || x.mnemonic() == Mnemonic::Mov && (is_reg(x, 0, Register::RBP) && is_reg(x, 1, Register::RSP) || is_reg(x, 0, Register::RSP) && is_reg(x, 1, Register::RBP));
        // `mov %rsp, %rdi`: the object at the stack pointer.
        if x.mnemonic() == Mnemonic::Mov && x.op_count() == 2 && x.op_kind(0) == OpKind::Register && x.op_kind(1) == OpKind::Register && frame_reg(x.op_register(1).full_register()) && !adjusts {
            let base = if x.op_register(1).full_register() == Register::RSP { *rsp } else { *rbp };
            out.insert(base?);
            continue;
        }
        let read_as_value = (1..x.op_count()).any(|i| x.op_kind(i) == OpKind::Register && frame_reg(x.op_register(i).full_register()))
            || (x.mnemonic() == Mnemonic::Push && x.op_kind(0) == OpKind::Register && frame_reg(x.op_register(0).full_register()));
        if !adjusts && read_as_value {
            return None;
        }
    }
    Some(out)
}

/// What an instruction reads and writes, with stack memory placed relative to the CFA.
/// Memory that is not the frame is state both versions share and is not tracked. So are the
/// contents of frame objects whose address escapes (buffers handed to callees) beyond the
/// function's own direct stores: what callees write there is shared state too, and
/// [`escaped_offsets`] makes sure both versions keep such objects at the same places.
fn locations(info: &InstructionInfo, x: &Instruction, rsp: Option<i64>, rbp: Option<i64>, clobbers: Clobbered) -> (Vec<Loc>, Vec<Def>) {
    let mut uses = BTreeSet::new();
    let mut defs: Vec<Def> = Vec::new();
    let is_call = matches!(x.flow_control(), FlowControl::Call | FlowControl::IndirectCall);
    // Zeroing idioms write without reading.
    let zeroing = matches!(x.mnemonic(), Mnemonic::Xor | Mnemonic::Sub | Mnemonic::Pxor | Mnemonic::Xorps | Mnemonic::Xorpd | Mnemonic::Vpxor | Mnemonic::Vxorps)
        && x.op_count() >= 2
        && x.op_kind(0) == OpKind::Register
        && x.op_kind(x.op_count() - 1) == OpKind::Register
        && x.op_register(0) == x.op_register(x.op_count() - 1);
    let explicit = |r: Register| (0..x.op_count()).any(|i| is_reg(x, i, r));
    let mut frame_bases = HashSet::new();
    for m in info.used_memory() {
        let base = m.base().full_register();
        let index = m.index().full_register();
        let slot = frame_slot(base, index, m.displacement() as i64, m.memory_size().size(), rsp, rbp);
        if slot.is_some() {
            frame_bases.insert(base);
        }
        if x.mnemonic() == Mnemonic::Lea || m.access() == OpAccess::NoMemAccess {
            continue;
        }
        if is_call && base == Register::RSP {
            continue; // the return address the call pushes belongs to the callee's frame
        }
        let reads = matches!(m.access(), OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite);
        let writes = matches!(m.access(), OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite);
        if let Some(at) = slot {
            if reads {
                uses.insert(at);
            }
            if writes {
                defs.push(Def { loc: at, partial: m.access() != OpAccess::Write || at == Loc::AnySlot, scratch: false });
            }
        }
    }
    for u in info.used_registers() {
        let full = location_of(u.register());
        if matches!(full, Register::RSP | Register::RIP | Register::None) || u.register().is_segment_register() {
            continue; // the stack pointer is tracked as an offset from the CFA
        }
        if frame_bases.contains(&full) && !explicit(full) {
            continue; // only the base of a frame slot
        }
        // A 32-bit write zero-extends, 8- and 16-bit writes keep the rest; a vector register is
        // its xmm (see `location_of`).
        let whole = u.register().is_gpr64() || u.register().is_gpr32() || u.register().is_vector_register();
        match u.access() {
            OpAccess::Read | OpAccess::CondRead => {
                if !zeroing {
                    uses.insert(Loc::Reg(full));
                }
            }
            OpAccess::Write => defs.push(Def { loc: Loc::Reg(full), partial: !whole, scratch: false }),
            OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite => {
                let clean = zeroing && u.access() != OpAccess::CondWrite;
                if !clean {
                    uses.insert(Loc::Reg(full));
                }
                defs.push(Def { loc: Loc::Reg(full), partial: !(clean && whole), scratch: false });
            }
            _ => {}
        }
    }
    if x.rflags_read() != 0 {
        uses.insert(Loc::Flags);
    }
    if x.rflags_modified() != 0 {
        let all = iced_x86::RflagsBits::OF | iced_x86::RflagsBits::SF | iced_x86::RflagsBits::ZF | iced_x86::RflagsBits::AF | iced_x86::RflagsBits::CF | iced_x86::RflagsBits::PF;
        defs.push(Def { loc: Loc::Flags, partial: x.rflags_modified() & all != all, scratch: false });
    }
    if is_call {
        // The ABI: arguments in, caller-saved registers and flags out; memory of an escaped
        // frame may be written by the callee.
        uses.extend(ARGS.iter().map(|r| Loc::Reg(*r)));
        defs.retain(|d| !matches!(d.loc, Loc::Flags | Loc::Reg(_)));
        // A register the callee (with its callees) leaves alone keeps its value: a local callee
        // under IPA-RA; what it may clobber is its result or its scratch.
        for r in CALLER_SAVED_GPR.iter().copied().chain((0..32).map(xmm)) {
            if clobbers.contains(r) {
                defs.push(Def { loc: Loc::Reg(r), partial: false, scratch: !RESULTS.contains(&r) });
            }
        }
        defs.push(Def { loc: Loc::Flags, partial: false, scratch: true });
    }
    // A partial or conditional write merges with the old value: liveness lets it through (such
    // a def does not kill), and the proof adds the old value as an input of that def only.
    defs.sort_by_key(|d| d.loc);
    defs.dedup();
    (uses.into_iter().collect(), defs)
}

/// The frame slot a memory operand addresses (base `%rsp`, or `%rbp` as a frame pointer): a
/// slot relative to the CFA, or stack memory at an untracked address (an index register, an
/// unknown stack offset); `None` for memory that is not the frame.
fn frame_slot(base: Register, index: Register, disp: i64, size: usize, rsp: Option<i64>, rbp: Option<i64>) -> Option<Loc> {
    let off = match base {
        Register::RSP => rsp,
        Register::RBP if rbp.is_some() => rbp,
        _ => return None,
    };
    Some(match (off, index) {
        (Some(o), Register::None) => Loc::Slot(o + disp, size.max(1) as u32),
        _ => Loc::AnySlot,
    })
}

/// The explicit operands of `x` as locations (frame memory placed relative to the CFA).
fn operands(info: &InstructionInfo, x: &Instruction, rsp: Option<i64>, rbp: Option<i64>) -> Vec<Operand> {
    let access = |k: u32| info.op_access(k);
    let reads = |a: OpAccess| matches!(a, OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite);
    let writes = |a: OpAccess| matches!(a, OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite);
    (0..x.op_count())
        .map(|k| match x.op_kind(k) {
            OpKind::Register => {
                let loc = location_of(x.op_register(k));
                if matches!(loc, Register::RSP | Register::RIP) || x.op_register(k).is_segment_register() {
                    Operand::Other
                } else {
                    Operand::Reg { loc: Loc::Reg(loc), read: reads(access(k)), write: writes(access(k)) }
                }
            }
            OpKind::Memory => {
                let base = x.memory_base().full_register();
                let index = x.memory_index().full_register();
                let slot = frame_slot(base, index, x.memory_displacement64() as i64, x.memory_size().size(), rsp, rbp);
                let mut address = Vec::new();
                if slot.is_none() && !matches!(base, Register::None | Register::RIP) {
                    address.push(Loc::Reg(base));
                }
                if index != Register::None {
                    address.push(Loc::Reg(index));
                }
                let a = access(k);
                // `lea` reads no memory: its operand is an address computation.
                let lea = x.mnemonic() == Mnemonic::Lea;
                Operand::Mem { address, slot, read: !lea && reads(a), write: !lea && writes(a) }
            }
            _ => Operand::Other,
        })
        .collect()
}

/// What `x` computes, without the registers and frame slots it names: two instructions of the
/// same shape compute the same function of corresponding operands.
fn shape_of(x: &Instruction, ops: &[Operand], uses: &[Loc], defs: &[Def], what: &[String]) -> String {
    use std::fmt::Write as _;
    let mut k = format!("{:?}", x.code());
    for i in 0..x.op_count() {
        match x.op_kind(i) {
            OpKind::Register => {
                let r = x.op_register(i);
                let _ = write!(k, "|r{}{}", r.size(), if matches!(location_of(r), Register::RSP | Register::RIP) { "sp" } else { "" });
            }
            OpKind::Memory => {
                let frame = matches!(&ops[i as usize], Operand::Mem { slot: Some(_), .. });
                let disp = if frame { 0 } else { x.memory_displacement64() as i64 };
                let _ = write!(k, "|m{}:{}:{}:{:?}", x.memory_size().size(), if frame { "frame" } else { "" }, disp, x.memory_index_scale());
            }
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => k.push_str("|b"),
            _ => {
                let _ = write!(k, "|i{:#x}", x.immediate(i));
            }
        }
    }
    // Locations touched implicitly (flags, a call's registers, push/pop slots) must be equal.
    let explicit: Vec<Loc> = ops
        .iter()
        .flat_map(|o| match o {
            Operand::Reg { loc, .. } => vec![*loc],
            Operand::Mem { address, slot, .. } => address.iter().copied().chain(slot.iter().copied()).collect(),
            Operand::Other => vec![],
        })
        .collect();
    let implicit_uses: Vec<&Loc> = uses.iter().filter(|u| !explicit.contains(u)).collect();
    let implicit_defs: Vec<&Def> = defs.iter().filter(|d| !explicit.contains(&d.loc)).collect();
    let _ = write!(k, "|{}|{implicit_uses:?}|{implicit_defs:?}", what.join(","));
    k
}

/// Pair old instructions with new ones: a longest common subsequence of their keys, after the
/// common prefix and suffix. `None` when the middle is too large to align.
fn align(o: &Func, n: &Func) -> Option<Vec<Option<usize>>> {
    align_by(o, n, |x| x.key)
}

fn align_by(o: &Func, n: &Func, key: impl Fn(&Insn) -> u32) -> Option<Vec<Option<usize>>> {
    let (a, b): (Vec<u32>, Vec<u32>) = (o.insns.iter().map(&key).collect(), n.insns.iter().map(&key).collect());
    let mut pairs = vec![None; a.len()];
    let mut p = 0;
    while p < a.len() && p < b.len() && a[p] == b[p] {
        pairs[p] = Some(p);
        p += 1;
    }
    let mut s = 0;
    while s < a.len() - p && s < b.len() - p && a[a.len() - 1 - s] == b[b.len() - 1 - s] {
        pairs[a.len() - 1 - s] = Some(b.len() - 1 - s);
        s += 1;
    }
    let (am, bm) = (&a[p..a.len() - s], &b[p..b.len() - s]);
    let (n1, m1) = (am.len() + 1, bm.len() + 1);
    if n1.checked_mul(m1)? > 40_000_000 {
        return None;
    }
    let mut t = vec![0u32; n1 * m1];
    for i in (0..am.len()).rev() {
        for j in (0..bm.len()).rev() {
            t[i * m1 + j] = if am[i] == bm[j] { t[(i + 1) * m1 + j + 1] + 1 } else { t[(i + 1) * m1 + j].max(t[i * m1 + j + 1]) };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < am.len() && j < bm.len() {
        if am[i] == bm[j] {
            pairs[p + i] = Some(p + j);
            i += 1;
            j += 1;
        } else if t[(i + 1) * m1 + j] >= t[i * m1 + j + 1] {
            i += 1;
        } else {
            j += 1;
        }
    }
    Some(pairs)
}

/// Pair the instructions the alignment left out with an unpaired instruction of the same
/// shape near where the alignment puts them: a compiler that schedules two independent
/// instructions the other way round (`xor %r15d,%r15d` before or after `mov %rdi,%r14`) leaves
/// them out of a longest common subsequence. Extra pairs are safe: the proof checks every
/// value it relies on.
fn fill_gaps(o: &Func, n: &Func, mut pairs: Vec<Option<usize>>) -> Vec<Option<usize>> {
    const WINDOW: usize = 8;
    let mut used = vec![false; n.insns.len()];
    for j in pairs.iter().flatten() {
        used[*j] = true;
    }
    let mut anchor: Option<(usize, usize)> = None;
    for k in 0..o.insns.len() {
        if let Some(j) = pairs[k] {
            anchor = Some((k, j));
            continue;
        }
        let expected = anchor.map_or(k, |(ak, aj)| aj + (k - ak));
        let lo = expected.saturating_sub(WINDOW);
        let hi = (expected + WINDOW + 1).min(n.insns.len());
        let best = (lo..hi).filter(|j| !used[*j] && n.insns[*j].shape == o.insns[k].shape).min_by_key(|j| j.abs_diff(expected));
        if let Some(j) = best {
            pairs[k] = Some(j);
            used[j] = true;
        }
    }
    pairs
}

fn invert(pairs: &[Option<usize>], n: usize) -> Vec<Option<usize>> {
    let mut back = vec![None; n];
    for (i, p) in pairs.iter().enumerate() {
        if let Some(j) = p {
            back[*j] = Some(i);
        }
    }
    back
}

/// The call in NEW that a frame stopped after call `i` of OLD continues after.
fn match_call(o: &Func, i: usize, n: &Func, pairs: &[Option<usize>]) -> Result<usize, String> {
    let key = o.insns[i].key;
    let ordinal = o.calls().filter(|k| o.insns[*k].key == key).position(|k| k == i).unwrap();
    let old_calls = o.calls().filter(|k| o.insns[*k].key == key).count();
    let new_calls: Vec<usize> = n.calls().filter(|k| n.insns[*k].key == key).collect();
    let r = o.insns[i].next_ip;
    if new_calls.len() != old_calls {
        return Err(format!(
            "return site {r:#x}: the new `{}` makes {} such calls where the old one makes {old_calls}, so which one continues this frame is not unique",
            n.name,
            new_calls.len()
        ));
    }
    let j = new_calls[ordinal];
    if let Some(p) = pairs[i] {
        if p != j {
            return Err(format!("return site {r:#x}: the call's position and its code's alignment disagree about its counterpart in the new `{}`", n.name));
        }
    }
    if o.depth[i] != n.depth[j] {
        return Err(format!("return site {r:#x}: the call is {} loops deep in the old `{}` and {} in the new one", o.depth[i], o.name, n.depth[j]));
    }
    if j + 1 >= n.insns.len() {
        return Err(format!("return site {r:#x}: the matching call ends the new `{}`", n.name));
    }
    Ok(j)
}

/// The frame is laid out the same way at R and R': same CFA rule, same places for the
/// callee-saved registers and the return address, just before and at the return address.
fn same_frame(ocfi: Option<&Modules>, o: &Func, i: usize, ncfi: Option<&Modules>, n: &Func, j: usize) -> Result<(), String> {
    let r = o.insns[i].next_ip;
    let (Some(oc), Some(nc)) = (ocfi, ncfi) else {
        return Err(format!("return site {r:#x}: no call-frame information (.eh_frame) to compare the frames"));
    };
    for (a, b) in [(o.insns[i].ip, n.insns[j].ip), (r, n.insns[j].next_ip)] {
        let ra = oc.row_at(a).map_err(|e| format!("return site {r:#x}: {e}"))?;
        let rb = nc.row_at(b).map_err(|e| format!("return site {r:#x}: {e}"))?;
        if ra != rb {
            return Err(format!("return site {r:#x}: the frame differs (call-frame information at {a:#x} in the old code: {ra}; at {b:#x} in the new: {rb})"));
        }
    }
    match (&o.escaped, &n.escaped) {
        (Some(a), Some(b)) if a == b => {}
        (Some(a), Some(b)) => {
            return Err(format!("return site {r:#x}: the frame objects whose address is passed on lie elsewhere (CFA offsets {a:?} in the old code, {b:?} in the new)"))
        }
        _ => return Err(format!("return site {r:#x}: an address of the frame escapes where it cannot be placed")),
    }
    let (x, y) = (&o.insns[i + 1], &n.insns[j + 1]);
    if x.rsp.is_none() || x.rsp != y.rsp || x.rbp != y.rbp {
        return Err(format!("return site {r:#x}: the stack pointer's distance from the frame differs or is unknown (old {:?}, new {:?})", x.rsp, y.rsp));
    }
    Ok(())
}

/// Site of a definition: an instruction, or the value the function was entered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Site {
    Entry,
    At(usize),
}

/// The proof that a frame of `to` may continue where a frame of `from` stands: `to`'s live
/// locations hold, in `from`, values defined the same way. `pairs` maps `to`'s instructions
/// to `from`'s.
struct Proof<'a> {
    to: &'a Func<'a>,
    from: &'a Func<'a>,
    pairs: &'a [Option<usize>],
    memo: HashMap<(Loc, usize, usize), bool>,
    /// `pairs` by shape (another register allocation), and the memo of [`Proof::moved`].
    shape_pairs: &'a [Option<usize>],
    memo2: HashMap<(Loc, usize, Loc, usize), bool>,
    budget: usize,
    /// The call the frame is stopped in (`to`'s index, `from`'s index): its result is the callee's.
    stopped_in: (usize, usize),
}

const BUDGET: usize = 200_000;

impl<'a> Proof<'a> {
    fn new(to: &'a Func<'a>, from: &'a Func<'a>, pairs: &'a [Option<usize>], shape_pairs: &'a [Option<usize>]) -> Self {
        Proof { to, from, pairs, memo: HashMap::new(), shape_pairs, memo2: HashMap::new(), budget: BUDGET, stopped_in: (usize::MAX, usize::MAX) }
    }

    /// `call_to` and `call_from` are the matched calls; the frames stand after them. A live
    /// callee-saved register that holds a constant made by one instruction in `to` (a hoisted
    /// address) need not be proven: the switch puts that constant in (returned).
    fn live_values_match(mut self, call_to: usize, call_from: usize) -> Result<Values, String> {
        self.stopped_in = (call_to, call_from);
        let (pt, pf) = (call_to + 1, call_from + 1);
        let live = live_in(self.to, pt);
        let live_from = live_in(self.from, pf);
        let r = self.from.insns[call_from].next_ip;
        let mut sets = Vec::new();
        let mut moves = Vec::new();
        for loc in live {
            // The frame's own position: compared through the CFI and the tracked offsets.
            if loc == Loc::Reg(Register::RSP) || (loc == Loc::Reg(Register::RBP) && self.to.insns[pt].rbp.is_some()) {
                continue;
            }
            // A failed attempt may leave co-inductive assumptions behind: forget them.
            let memo = self.memo.clone();
            let proven = self.same(loc, pt, pf);
            let Err(why) = proven else { continue };
            self.memo = memo;
            if let Some(set) = self.constant(loc, pt) {
                sets.push(set);
                continue;
            }
            if let Some(mv) = self.moved(loc, pt, pf, &live_from) {
                moves.push(mv);
                continue;
            }
            return Err(format!("return site {r:#x} of `{}`: the new code reads {} after the call, and {why}", self.from.name, loc.show()));
        }
        Ok(Values { sets, moves })
    }

    /// Another register allocation: a location of `from`'s frame at `pf` that holds the value
    /// `to` expects in `lt` at `pt`, proven with instructions paired by shape; the switch then
    /// moves it. Both must be places a stopped frame keeps (callee-saved registers, frame slots).
    fn moved(&mut self, lt: Loc, pt: usize, pf: usize, live_from: &BTreeSet<Loc>) -> Option<Move> {
        let to = place(lt)?;
        for &lf in live_from {
            let Some(from) = place(lf) else { continue };
            let (memo, memo2) = (self.memo.clone(), self.memo2.clone());
            if self.same2(lt, pt, lf, pf).is_ok() {
                return Some(Move { from, to });
            }
            (self.memo, self.memo2) = (memo, memo2);
        }
        None
    }

    /// Whether `lt` before `pt` in `to` holds the value `lf` holds before `pf` in `from`, their
    /// definitions paired by shape and corresponding operand by operand.
    fn same2(&mut self, lt: Loc, pt: usize, lf: Loc, pf: usize) -> Result<(), String> {
        if lt == lf {
            let memo = self.memo.clone();
            if self.same(lt, pt, pf).is_ok() {
                return Ok(());
            }
            self.memo = memo;
        }
        if let Some(&ok) = self.memo2.get(&(lt, pt, lf, pf)) {
            return if ok { Ok(()) } else { Err(format!("{} and {} differ", lt.show(), lf.show())) };
        }
        if lt == Loc::AnySlot || lf == Loc::AnySlot || self.budget == 0 {
            return Err("untracked stack memory, or too many steps".into());
        }
        self.budget -= 1;
        self.memo2.insert((lt, pt, lf, pf), true);
        let r = self.same2_uncached(lt, pt, lf, pf);
        self.memo2.insert((lt, pt, lf, pf), r.is_ok());
        r
    }

    fn same2_uncached(&mut self, lt: Loc, pt: usize, lf: Loc, pf: usize) -> Result<(), String> {
        let dt = Self::reaching(self.to, pt, lt);
        let df = Self::reaching(self.from, pf, lf);
        let differ = || format!("{} and {} are written at different places", lt.show(), lf.show());
        if dt.len() != df.len() {
            return Err(differ());
        }
        let mut defs = Vec::new();
        // One definition on each side: whatever path led here, the value comes from those two
        // instructions, so they correspond if they compute the same thing. With several, the
        // alignment says which corresponds to which (the same paths through both versions).
        let single = match (dt.iter().next(), df.iter().next()) {
            (Some(Site::At(i)), Some(Site::At(j))) if dt.len() == 1 && df.len() == 1 && self.to.insns[*i].shape == self.from.insns[*j].shape => Some((*i, *j)),
            _ => None,
        };
        for s in dt.iter().filter(|_| single.is_none()) {
            match *s {
                Site::Entry if lt == lf && df.contains(&Site::Entry) => {}
                Site::At(i) => match self.shape_pairs[i] {
                    Some(j) if df.contains(&Site::At(j)) => defs.push((i, j)),
                    _ => return Err(differ()),
                },
                _ => return Err(differ()),
            }
        }
        defs.extend(single);
        for (i, j) in defs {
            let (x, y) = (&self.to.insns[i], &self.from.insns[j]);
            let scratch = |z: &Insn, l: Loc| z.defs.iter().any(|d| d.scratch && d.loc == l);
            if scratch(x, lt) && scratch(y, lf) {
                continue;
            }
            let mut inputs: Vec<(Loc, Loc)> = Vec::new();
            if x.call {
                // A call's result is in fixed registers; what it leaves alone passes through.
                let result = matches!(lt, Loc::Reg(r) if RESULTS.contains(&r));
                if lt != lf && result {
                    return Err(differ());
                }
                if !result {
                    inputs.push((lt, lf));
                }
                if (i, j) != self.stopped_in {
                    inputs.extend(ARGS.iter().map(|a| (Loc::Reg(*a), Loc::Reg(*a))).filter(|(a, _)| x.uses.contains(a)));
                }
                inputs.extend(operand_inputs(&x.ops, &y.ops)?.into_iter().filter(|(a, _)| x.uses.contains(a)));
            } else {
                let written = |z: &Insn, l: Loc| {
                    z.ops.iter().position(|o| match o {
                        Operand::Reg { loc, write: true, .. } => *loc == l,
                        Operand::Mem { slot: Some(s), write: true, .. } => *s == l,
                        _ => false,
                    })
                };
                match (written(x, lt), written(y, lf)) {
                    (Some(a), Some(b)) if a == b => {}
                    (None, None) if lt == lf => {}
                    _ => return Err(differ()),
                }
                let partial = x.defs.iter().any(|d| d.loc.overlaps(lt) && (d.partial || !d.loc.covers(lt)));
                if partial {
                    inputs.push((lt, lf));
                }
                // What the instruction really reads (a zeroing idiom names its register twice).
                inputs.extend(operand_inputs(&x.ops, &y.ops)?.into_iter().filter(|(a, _)| x.uses.contains(a)));
                // Implicit reads are the same locations on both sides (the shapes are equal).
                let explicit = |z: &Insn| -> Vec<Loc> { z.ops.iter().flat_map(operand_locs).collect() };
                let ex = explicit(x);
                inputs.extend(x.uses.iter().filter(|u| !ex.contains(u)).map(|u| (*u, *u)));
            }
            for (a, b) in inputs {
                if a == Loc::Reg(Register::RSP) && b == a {
                    continue;
                }
                self.same2(a, i, b, j)?;
            }
        }
        Ok(())
    }

    /// `loc`, live before `pt` in `to`, is a callee-saved register that only one instruction
    /// can have set, to a constant.
    fn constant(&self, loc: Loc, pt: usize) -> Option<RegFromCode> {
        let Loc::Reg(r) = loc else { return None };
        let dwarf = dwarf_callee_saved(r)?;
        let defs = Self::reaching(self.to, pt, loc);
        let [Site::At(i)] = defs.iter().copied().collect::<Vec<_>>()[..] else { return None };
        let x = &self.to.insns[i];
        let whole = x.defs.iter().any(|d| d.loc == loc && !d.partial);
        (x.constant && whole && x.uses.is_empty()).then_some(RegFromCode { reg: dwarf, at: x.ip })
    }

    /// Reaching definitions of `loc` just before instruction `point` of `f`.
    fn reaching(f: &Func, point: usize, loc: Loc) -> BTreeSet<Site> {
        let mut out = BTreeSet::new();
        let mut seen = HashSet::new();
        let mut work: Vec<usize> = f.preds[point].clone();
        if point == 0 {
            out.insert(Site::Entry);
        }
        while let Some(q) = work.pop() {
            if !seen.insert(q) {
                continue;
            }
            if f.insns[q].defs.iter().any(|d| d.loc.overlaps(loc)) {
                out.insert(Site::At(q));
                continue;
            }
            if q == 0 {
                out.insert(Site::Entry);
            }
            work.extend(f.preds[q].iter().copied());
        }
        out
    }

    /// Whether `loc` holds the same value before `pt` in `to` and before `pf` in `from`.
    fn same(&mut self, loc: Loc, pt: usize, pf: usize) -> Result<(), String> {
        if let Some(&ok) = self.memo.get(&(loc, pt, pf)) {
            return if ok { Ok(()) } else { Err(format!("{} differs before {}", loc.show(), self.to.at(pt))) };
        }
        if loc == Loc::AnySlot {
            return Err("the new code reads stack memory whose address it computes".into());
        }
        if self.budget == 0 {
            return Err("the proof took too many steps".into());
        }
        self.budget -= 1;
        // Co-induction: around a loop, assume what is being proved.
        self.memo.insert((loc, pt, pf), true);
        let r = self.same_uncached(loc, pt, pf);
        self.memo.insert((loc, pt, pf), r.is_ok());
        r
    }

    fn same_uncached(&mut self, loc: Loc, pt: usize, pf: usize) -> Result<(), String> {
        let dt = Self::reaching(self.to, pt, loc);
        let df = Self::reaching(self.from, pf, loc);
        let mapped: BTreeSet<Site> = dt
            .iter()
            .map(|s| match s {
                Site::Entry => Some(Site::Entry),
                Site::At(i) => self.pairs[*i].map(Site::At),
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                let unpaired = dt.iter().find_map(|s| match s {
                    Site::At(i) if self.pairs[*i].is_none() => Some(self.to.insns[*i].ip),
                    _ => None,
                });
                format!("{} is written at {:#x} by code that has no counterpart", loc.show(), unpaired.unwrap_or(0))
            })?;
        if mapped != df {
            return Err(format!("{} is written at different places in the two versions before {}", loc.show(), self.to.at(pt)));
        }
        for s in dt {
            let Site::At(i) = s else { continue };
            let j = self.pairs[i].unwrap();
            let x = &self.to.insns[i];
            let partial = x.defs.iter().any(|d| d.loc.overlaps(loc) && (d.partial || !d.loc.covers(loc)));
            if x.defs.iter().any(|d| d.scratch && d.loc == loc) {
                continue; // scratch of the same callee on both sides
            }
            let mut inputs: Vec<Loc> = Vec::new();
            if x.call {
                if (i, j) != self.stopped_in {
                    // Same callee (the keys are equal), so the same result for the same arguments
                    // and the same call target.
                    inputs.extend(x.uses.iter().copied());
                } else {
                    // The call the frame stands in: its result is what the callee will return.
                    inputs.extend(x.uses.iter().copied().filter(|u| !ARGS.iter().any(|a| *u == Loc::Reg(*a))));
                }
                let result = matches!(loc, Loc::Reg(r) if RESULTS.contains(&r));
                if !result {
                    inputs.push(loc); // the callee may leave it as it was
                }
            } else {
                inputs.extend(x.uses.iter().copied());
                if partial && !inputs.contains(&loc) {
                    inputs.push(loc);
                }
            }
            for u in inputs {
                if u == Loc::Reg(Register::RSP) && x.rsp.is_some() && x.rsp == self.from.insns[j].rsp {
                    continue;
                }
                if u == Loc::Reg(Register::RBP) && x.rbp.is_some() && x.rbp == self.from.insns[j].rbp {
                    continue;
                }
                self.same(u, i, j)?;
            }
        }
        Ok(())
    }
}

/// What a switched frame gets besides its return address: constants, and values moved from
/// where the old code keeps them.
struct Values {
    sets: Vec<RegFromCode>,
    moves: Vec<Move>,
}

/// A location as a place of a stopped frame the switch can read and write: a callee-saved
/// register (DWARF number) or a frame slot.
fn place(l: Loc) -> Option<Place> {
    match l {
        Loc::Reg(r) => Some(Place::Reg(dwarf_callee_saved(r)?)),
        Loc::Slot(offset, width) if width <= 8 => Some(Place::Slot { offset, width }),
        _ => None,
    }
}

fn dwarf_callee_saved(r: Register) -> Option<u16> {
    Some(match r {
        Register::RBX => 3,
        Register::RBP => 6,
        Register::R12 => 12,
        Register::R13 => 13,
        Register::R14 => 14,
        Register::R15 => 15,
        _ => return None,
    })
}

/// The locations an operand names.
fn operand_locs(o: &Operand) -> Vec<Loc> {
    match o {
        Operand::Reg { loc, .. } => vec![*loc],
        Operand::Mem { address, slot, .. } => address.iter().copied().chain(slot.iter().copied()).collect(),
        Operand::Other => vec![],
    }
}

/// Corresponding inputs of two instructions of the same shape: read registers, address
/// registers, read frame slots, operand by operand.
fn operand_inputs(a: &[Operand], b: &[Operand]) -> Result<Vec<(Loc, Loc)>, String> {
    let mut out = Vec::new();
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Operand::Reg { loc: p, read: true, .. }, Operand::Reg { loc: q, read: true, .. }) => out.push((*p, *q)),
            (Operand::Mem { address: p, slot: s, read, .. }, Operand::Mem { address: q, slot: t, .. }) => {
                if p.len() != q.len() || s.is_some() != t.is_some() {
                    return Err("operands of another form".into());
                }
                out.extend(p.iter().copied().zip(q.iter().copied()));
                if let (true, Some(s), Some(t)) = (*read, s, t) {
                    out.push((*s, *t));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Locations `f` reads at or after `point` before writing them, until it returns.
fn live_in(f: &Func, point: usize) -> BTreeSet<Loc> {
    let n = f.insns.len();
    let mut live_in: Vec<BTreeSet<Loc>> = vec![BTreeSet::new(); n];
    let exit_live = |e: Exit| -> BTreeSet<Loc> {
        let mut s: BTreeSet<Loc> = CALLEE_SAVED.iter().map(|r| Loc::Reg(*r)).collect();
        match e {
            Exit::Return => s.extend(RESULTS.iter().map(|r| Loc::Reg(*r))),
            Exit::TailJump => {
                s.extend(ARGS.iter().map(|r| Loc::Reg(*r)));
                s.extend((0..8).map(|k| Loc::Reg(xmm(k))));
            }
        }
        s
    };
    let mut changed = true;
    while changed {
        changed = false;
        for i in (0..n).rev() {
            let x = &f.insns[i];
            let mut out: BTreeSet<Loc> = x.succ.iter().flat_map(|s| live_in[*s].iter().copied()).collect();
            if let Some(e) = x.exit {
                out.extend(exit_live(e));
            }
            for d in &x.defs {
                if !d.partial {
                    out.retain(|l| !d.loc.covers(*l));
                }
            }
            out.extend(x.uses.iter().copied());
            if out != live_in[i] {
                live_in[i] = out;
                changed = true;
            }
        }
    }
    std::mem::take(&mut live_in[point])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_overlap_by_bytes() {
        assert!(Loc::Slot(-16, 8).overlaps(Loc::Slot(-12, 4)));
        assert!(!Loc::Slot(-16, 8).overlaps(Loc::Slot(-8, 8)));
        assert!(Loc::Slot(-16, 8).covers(Loc::Slot(-12, 4)));
        assert!(!Loc::Slot(-12, 4).covers(Loc::Slot(-16, 8)));
        assert!(Loc::AnySlot.overlaps(Loc::Slot(-8, 8)));
        assert!(!Loc::AnySlot.covers(Loc::Slot(-8, 8)));
    }

    #[test]
    fn vector_registers_are_their_xmm() {
        assert_eq!(xmm(0), Register::XMM0);
        assert_eq!(xmm(15), Register::XMM15);
        assert_eq!(xmm(31), Register::XMM31);
        assert_eq!(location_of(Register::YMM3), Register::XMM3);
        assert_eq!(location_of(Register::ZMM20), Register::XMM20);
        assert_eq!(location_of(Register::EAX), Register::RAX);
    }

    fn decode_bytes(code: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, code, 0x1000, DecoderOptions::NONE).into_iter().collect()
    }

    #[test]
    fn stack_offsets_follow_pushes_and_frame_setup() {
        // push rbp; mov rbp,rsp; push rbx; sub rsp,0x18; add rsp,0x18; pop rbx; pop rbp; ret
        let raw = decode_bytes(&[0x55, 0x48, 0x89, 0xe5, 0x53, 0x48, 0x83, 0xec, 0x18, 0x48, 0x83, 0xc4, 0x18, 0x5b, 0x5d, 0xc3]);
        let succ: Vec<Vec<usize>> = (0..raw.len()).map(|i| if i + 1 < raw.len() { vec![i + 1] } else { vec![] }).collect();
        let s = stack_offsets(&raw, &succ);
        let rsp: Vec<Option<i64>> = s.iter().map(|x| x.0).collect();
        assert_eq!(rsp, vec![Some(-8), Some(-16), Some(-16), Some(-24), Some(-48), Some(-24), Some(-16), Some(-8)]);
        assert_eq!(s[2].1, Some(-16), "rbp is the frame pointer after mov rbp,rsp");
        assert_eq!(s[7].1, None, "pop rbp restores the caller's");
    }
}
