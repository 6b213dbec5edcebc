//! References: the address references of a function's machine code (decoded, with
//! `--emit-relocs` relocations folded in when NEW has them), and what the code reaches through
//! them that is not a symbol: PIE jump tables, pointer words in read-only data, the extent of
//! an anonymous read-only item, thread-pointer offsets (TLS variables and thread control block
//! fields).
use crate::arch::x86_64::{self, CodeRef, RefKind};
use crate::elf::{ElfFile, SymKind, Symbol};
use crate::error::{Error, RefusalKind, Result};
use goblin::elf::reloc::*;
use std::collections::BTreeSet;

/// How much anonymous read-only data (string literals, jump tables) one reference carries at most.
const MAX_ANON_CHUNK: u64 = 4096;

/// Address references of a function, with `--emit-relocs` information folded in.
pub(super) fn function_refs(elf: &ElfFile, f: &Symbol) -> Result<Vec<CodeRef>> {
    let code = elf.read(f.addr, f.size as usize).ok_or_else(|| Error::Elf {
        path: elf.path.clone(),
        msg: format!("function {} at {:#x} has no bytes in the file", f.name, f.addr),
    })?;
    let mut refs = x86_64::decode_refs(code, f.addr).map_err(|e| Error::Elf {
        path: elf.path.clone(),
        msg: format!("cannot decode function {}: {e}", f.name),
    })?;
    let (lo, hi) = elf.image_range();
    let relocs = relocs_in(elf, f.addr, f.end());
    if !elf.relocs.is_empty() {
        // With relocations, an absolute field is an address exactly when a relocation says so.
        let at: BTreeSet<u64> = relocs.iter().map(|r| r.at).collect();
        refs.retain(|r| !is_absolute(r.kind) || at.contains(&(f.addr + r.field_off as u64)));
        // A thread-pointer offset carried by an immediate or displacement (`lea off(%rax)`).
        for r in refs.iter_mut() {
            let tls = relocs.iter().any(|x| x.at == f.addr + r.field_off as u64 && matches!(x.kind, R_X86_64_TPOFF32 | R_X86_64_GOTTPOFF));
            if tls && r.field_size == 4 {
                r.kind = RefKind::TpOff32;
                r.target = r.target as u32 as i32 as i64 as u64;
            }
        }
        // A relocated field the decoder did not see would be a bug in our decoding: refuse.
        for r in relocs {
            let covered = refs.iter().any(|c| f.addr + c.field_off as u64 == r.at);
            if !covered && matches!(r.kind, R_X86_64_TPOFF32 | R_X86_64_GOTTPOFF) {
                // An offset from the thread pointer in an immediate or a displacement
                // (`mov %fs:0,%rax; lea off(%rax)`): only the relocation shows it.
                let off = (r.at - f.addr) as usize;
                if let Some(b) = code.get(off..off + 4) {
                    let v = i32::from_le_bytes(b.try_into().unwrap()) as i64 as u64;
                    refs.push(CodeRef {
                        ip: r.at,
                        next_ip: r.at + 4,
                        field_off: off,
                        field_size: 4,
                        kind: RefKind::TpOff32,
                        target: v,
                        is_mem: false,
                        is_lea: false,
                        is_branch: false,
                        is_call: false,
                        maybe_number: false,
                        jump_table: false,
                    });
                    continue;
                }
            }
            if !covered && !matches!(r.kind, R_X86_64_NONE) {
                return Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!(
                    "function {}: relocation of type {} at {:#x} does not match any decoded operand",
                    f.name, r.kind, r.at
                )));
            }
        }
    } else {
        // Without relocations: an absolute candidate in a PIE is a number; in a non-PIE it is
        // an address when it falls inside the image.
        refs.retain(|r| !is_absolute(r.kind) || r.jump_table || (!elf.pie && r.target >= lo && r.target < hi));
    }
    Ok(refs)
}

pub(super) fn relocs_in(elf: &ElfFile, lo: u64, hi: u64) -> &[crate::elf::Reloc] {
    let a = elf.relocs.partition_point(|r| r.at < lo);
    let b = elf.relocs.partition_point(|r| r.at < hi);
    &elf.relocs[a..b]
}

pub(super) fn is_absolute(k: RefKind) -> bool {
    matches!(k, RefKind::Abs32 | RefKind::Abs32S | RefKind::Abs64)
}

/// A PIE jump table of `f` at `t`: 32-bit offsets from the table to targets inside `f`
/// (`lea table(%rip); movslq (table,idx,4); add; jmp *`). Its bytes change whenever the code
/// moves; what it means is the list of targets as offsets into `f`.
pub(super) fn relative_jump_table(elf: &ElfFile, f: &Symbol, t: u64) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    while out.len() < 4096 {
        let Some(w) = elf.read(t + 4 * out.len() as u64, 4) else { break };
        let target = (t as i64).wrapping_add(i32::from_le_bytes(w.try_into().unwrap()) as i64) as u64;
        if !f.contains(target) {
            break;
        }
        out.push(target - f.addr);
    }
    (out.len() >= 2).then_some(out)
}

/// Pointer words inside read-only data of a non-PIE file (PIE files keep such data in
/// writable, relocated sections): 8-byte aligned values inside the image.
pub(super) fn pointer_words(elf: &ElfFile, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    if elf.pie || !elf.relocs.is_empty() {
        return Vec::new();
    }
    let (ilo, ihi) = elf.image_range();
    let mut out = Vec::new();
    let mut a = lo.div_ceil(8) * 8;
    while a + 8 <= hi {
        if let Some(w) = elf.read(a, 8) {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            if v >= ilo && v < ihi {
                out.push((a, v));
            }
        }
        a += 8;
    }
    out
}

/// End of the anonymous chunk starting at `t`: the next symbol, the section end, or a cap.
pub(super) fn anon_end(elf: &ElfFile, t: u64, sec: &crate::elf::Section) -> u64 {
    let mut end = (sec.addr + sec.size).min(t + MAX_ANON_CHUNK);
    if let Some(n) = elf.next_symbol_after(t) {
        if n.addr > t {
            end = end.min(n.addr);
        }
    }
    end.max(t + 1)
}

/// A thread-pointer offset at or above the thread pointer: a field of the thread control block
/// (x86-64 TLS variant II puts every TLS block below the thread pointer), not a variable.
pub(super) fn is_tcb_field(tpoff: i64) -> bool {
    (0..0x1000).contains(&tpoff)
}

pub(super) fn tls_symbol(elf: &ElfFile, tpoff: i64) -> Option<(&Symbol, i64)> {
    let tls = elf.tls.as_ref()?;
    elf.symbols.iter().filter(|s| s.kind == SymKind::Tls).find_map(|s| {
        let start = tls.tpoff(tls_offset(tls, s.addr));
        (tpoff >= start && tpoff < start + s.size.max(1) as i64).then(|| (s, tpoff - start))
    })
}

/// TLS symbol values are offsets in the TLS template in linked files; tolerate absolute ones.
pub(super) fn tls_offset(tls: &crate::elf::Tls, value: u64) -> u64 {
    if value < tls.memsz || tls.vaddr == 0 {
        value
    } else {
        value.saturating_sub(tls.vaddr)
    }
}
