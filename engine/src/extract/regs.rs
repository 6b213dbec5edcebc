//! The register contract between a patched function and its unpatched callers.
//!
//! Without `-flive-patching` (GCC's default `-fipa-ra`), a caller in the same unit (or the same
//! LTO partition) keeps values in caller-saved registers across a call when it knows the callee
//! leaves them alone. If the new body clobbers a register the old body (with everything it
//! calls) left intact, such a caller would break. The patched entry then goes through a thunk
//! that saves and restores exactly those registers (see `arch::x86_64::preserve_thunk`).
//!
//! Clobber sets follow BOLT's RegAnalysis: the registers a function writes, plus, transitively,
//! those of its direct callees in the same file; a call through the PLT, a pointer or a tail
//! jump through a register clobbers the ABI's whole caller-saved set.
use crate::elf::{ElfFile, SymKind, Symbol};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind, Register};
use std::collections::HashMap;

/// Caller-saved registers of the System V x86-64 ABI: bits 0-15 general registers (iced's
/// order: rax rcx rdx rbx rsp rbp rsi rdi r8..r15), bits 16-47 xmm0-xmm31.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegSet(pub u64);

const GPR_NAMES: [&str; 16] = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];

impl RegSet {
    /// rax rcx rdx rsi rdi r8-r11 and every vector register.
    pub const CALLER_SAVED: RegSet = RegSet(0b0000_1111_1100_0111 | (0xffff_ffffu64 << 16));

    pub fn union(self, o: RegSet) -> RegSet {
        RegSet(self.0 | o.0)
    }
    pub fn minus(self, o: RegSet) -> RegSet {
        RegSet(self.0 & !o.0)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Register names, general registers first.
    pub fn names(self) -> Vec<String> {
        (0..48).filter(|i| self.0 & (1 << i) != 0).map(|i| if i < 16 { GPR_NAMES[i].to_string() } else { format!("xmm{}", i - 16) }).collect()
    }
    pub fn from_names(names: &[String]) -> Option<RegSet> {
        let mut s = 0u64;
        for n in names {
            let i = match GPR_NAMES.iter().position(|g| g == n) {
                Some(i) => i,
                None => 16 + n.strip_prefix("xmm")?.parse::<usize>().ok().filter(|x| *x < 32)?,
            };
            s |= 1 << i;
        }
        Some(RegSet(s))
    }

    /// General registers in iced's numbering (0 = rax .. 15 = r15), as the thunk encodes them.
    pub fn gprs(self) -> Vec<u8> {
        (0u8..16).filter(|i| self.0 & (1 << i) != 0).collect()
    }

    /// Vector registers by number (xmm0 = 0).
    pub fn xmms(self) -> Vec<u8> {
        (0u8..32).filter(|i| self.0 & (1 << (16 + i)) != 0).collect()
    }

    fn of(reg: Register) -> RegSet {
        let full = reg.full_register();
        if full.is_gpr64() {
            return RegSet(1 << (full as u32 - Register::RAX as u32));
        }
        if reg.is_vector_register() {
            let n = reg.number();
            if n < 32 {
                return RegSet(1 << (16 + n));
            }
        }
        RegSet(0)
    }
}

/// Computes clobber sets of one file's functions, memoised.
pub struct Clobbers<'a> {
    elf: &'a ElfFile,
    memo: HashMap<u64, RegSet>,
}

impl<'a> Clobbers<'a> {
    pub fn new(elf: &'a ElfFile) -> Self {
        Clobbers { elf, memo: HashMap::new() }
    }

    /// Caller-saved registers `f` may change before it returns.
    pub fn of(&mut self, f: &Symbol) -> RegSet {
        self.compute(f, 0)
    }

    fn compute(&mut self, f: &Symbol, depth: usize) -> RegSet {
        if let Some(s) = self.memo.get(&f.addr) {
            return *s;
        }
        // Recursion (or an absurd call depth) is resolved conservatively.
        self.memo.insert(f.addr, RegSet::CALLER_SAVED);
        if depth > 64 {
            return RegSet::CALLER_SAVED;
        }
        let Some(code) = self.elf.read(f.addr, f.size as usize) else { return RegSet::CALLER_SAVED };
        let mut set = RegSet(0);
        let mut decoder = Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE);
        let mut factory = InstructionInfoFactory::new();
        let mut insn = Instruction::default();
        let mut callees = Vec::new();
        while decoder.can_decode() {
            decoder.decode_out(&mut insn);
            if insn.is_invalid() {
                set = RegSet::CALLER_SAVED;
                break;
            }
            for u in factory.info(&insn).used_registers() {
                if matches!(u.access(), OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite) {
                    set = set.union(RegSet::of(u.register()));
                }
            }
            match insn.flow_control() {
                FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                    if matches!(insn.op0_kind(), OpKind::NearBranch64) =>
                {
                    let t = insn.near_branch_target();
                    if !f.contains(t) {
                        callees.push(t);
                    }
                }
                FlowControl::IndirectCall => set = RegSet::CALLER_SAVED,
                // A jump through memory leaves the function (a GOT slot: a tail call); through a
                // register it may be a switch: conservative either way.
                FlowControl::IndirectBranch => set = RegSet::CALLER_SAVED,
                FlowControl::Call => set = RegSet::CALLER_SAVED,
                _ => {}
            }
        }
        for t in callees {
            if set == RegSet::CALLER_SAVED {
                break;
            }
            let callee = self.elf.symbol_at(t).filter(|s| s.kind == SymKind::Func && s.addr == t).cloned();
            set = set.union(match callee {
                Some(c) => self.compute(&c, depth + 1),
                // The PLT, code without a symbol, the middle of a function: anything.
                None => RegSet::CALLER_SAVED,
            });
        }
        let set = RegSet(set.0 & RegSet::CALLER_SAVED.0);
        self.memo.insert(f.addr, set);
        set
    }
}

/// Registers new `nf` clobbers that old `of` (with its callees) left intact.
pub fn extra_clobbers(old: &ElfFile, of: &Symbol, new: &ElfFile, nf: &Symbol) -> RegSet {
    Clobbers::new(new).of(nf).minus(Clobbers::new(old).of(of))
}

/// Every register the instructions of `f` read or write: a caller can only keep a value
/// across a call in a register it uses.
pub fn used_by(elf: &ElfFile, f: &Symbol) -> RegSet {
    let Some(code) = elf.read(f.addr, f.size as usize) else { return RegSet::CALLER_SAVED };
    let mut set = RegSet(0);
    let mut decoder = Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return RegSet::CALLER_SAVED;
        }
        for u in factory.info(&insn).used_registers() {
            set = set.union(RegSet::of(u.register()));
        }
    }
    set
}

/// The address of an instruction of `f` that reads its caller's frame (stack-passed
/// arguments, `va_start` of a variadic function), found with the call-frame information: a
/// memory operand based on the CFA register at or above the CFA. A thunk in front of such a
/// function would move those arguments.
pub fn reads_caller_frame(elf: &ElfFile, f: &Symbol) -> Option<u64> {
    use gimli::{BaseAddresses, CfaRule, EhFrame, LittleEndian, UnwindContext, UnwindSection};
    let Some((sec, data)) = elf.section_data(".eh_frame") else { return Some(f.addr) };
    let eh = EhFrame::new(data, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(sec.addr);
    if let Some(t) = elf.section(".text") {
        bases = bases.set_text(t.addr);
    }
    let mut ctx = UnwindContext::new();
    let code = elf.read(f.addr, f.size as usize)?;
    let mut decoder = Decoder::with_ip(64, code, f.addr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        let has_mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
        if !has_mem || insn.memory_index() != Register::None {
            continue;
        }
        let base = insn.memory_base();
        if base != Register::RSP && base != Register::RBP {
            continue;
        }
        let disp = insn.memory_displacement64() as i64;
        let Ok(row) = eh.unwind_info_for_address(&bases, &mut ctx, insn.ip(), EhFrame::cie_from_offset) else {
            return Some(insn.ip()); // no CFI: cannot tell
        };
        if let CfaRule::RegisterAndOffset { register, offset } = row.cfa() {
            let cfa_reg = if register.0 == 7 { Register::RSP } else if register.0 == 6 { Register::RBP } else { continue };
            if cfa_reg == base && disp >= *offset {
                return Some(insn.ip());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        let s = RegSet::from_names(&["rcx".into(), "r11".into(), "xmm3".into()]).unwrap();
        assert_eq!(s.names(), vec!["rcx", "r11", "xmm3"]);
        assert!(RegSet::from_names(&["bogus".into()]).is_none());
        assert!(RegSet::CALLER_SAVED.names().contains(&"rdi".to_string()));
        assert!(!RegSet::CALLER_SAVED.names().contains(&"rbx".to_string()));
        assert!(!RegSet::CALLER_SAVED.names().contains(&"rsp".to_string()));
    }

    #[test]
    fn thunk_numbering() {
        let s = RegSet::from_names(&["rcx".into(), "r9".into(), "xmm0".into(), "xmm12".into()]).unwrap();
        assert_eq!(s.gprs(), vec![1, 9]);
        assert_eq!(s.xmms(), vec![0, 12]);
    }

    #[test]
    fn register_mapping() {
        assert_eq!(RegSet::of(Register::EAX).names(), vec!["rax"]);
        assert_eq!(RegSet::of(Register::R9D).names(), vec!["r9"]);
        assert_eq!(RegSet::of(Register::YMM5).names(), vec!["xmm5"]);
    }
}
