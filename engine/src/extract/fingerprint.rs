//! Fingerprints: code and data as they read independently of where the linker put things. A
//! function is its code with every reference field zeroed plus, per reference, what it
//! designates (a symbol, a PLT or GOT entry, a string literal's content, a PIE jump table's
//! targets); read-only data is its bytes with pointer words replaced the same way. Two builds
//! of unchanged source give the same fingerprints however far their addresses moved.
use super::refs::{anon_end, function_refs, is_tcb_field, pointer_words, relative_jump_table, tls_symbol};
use crate::arch::x86_64::{CodeRef, RefKind};
use crate::elf::{ElfFile, GotSlot, SymKind, Symbol};
use crate::error::Result;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Normalised form of a function: code with reference fields zeroed, plus what they point at.
pub(super) fn normalise(elf: &ElfFile, f: &Symbol) -> Result<(Vec<u8>, Vec<String>)> {
    let mut code = elf.read(f.addr, f.size as usize).unwrap_or(&[]).to_vec();
    let refs = function_refs(elf, f)?;
    let mut what = Vec::with_capacity(refs.len());
    for r in &refs {
        let end = (r.field_off + r.field_size as usize).min(code.len());
        code[r.field_off..end].fill(0);
        what.push(describe(elf, f, r));
    }
    Ok((code, what))
}

/// A description of what a reference points at, independent of where things were placed.
pub(super) fn describe(elf: &ElfFile, f: &Symbol, r: &CodeRef) -> String {
    let t = r.target;
    if r.kind == RefKind::TpOff32 {
        if t == 0 {
            return "tp".into(); // reads the thread pointer itself
        }
        if is_tcb_field(t as i64) {
            return format!("tcb+{t}");
        }
        return match tls_symbol(elf, t as i64) {
            Some((s, off)) => format!("tls:{}+{off}", elf.stable_key(s)),
            None => format!("tls?{}", t as i64),
        };
    }
    if f.contains(t) {
        return format!("self+{}", t - f.addr);
    }
    if elf.pie && elf.symbol_at(t).is_none() && elf.section_at(t).is_some_and(|s| !s.is_exec() && !s.is_writable()) {
        if let Some(targets) = relative_jump_table(elf, f, t) {
            return format!("jump-table:{targets:?}");
        }
    }
    if let Some((_, name)) = elf.plt_entry(t) {
        return format!("plt:{name}");
    }
    if let Some(slot) = elf.got.get(&t) {
        return match slot {
            GotSlot::Symbol(n) => format!("got:{n}"),
            GotSlot::Local(a) => format!("got-local:{}", describe_addr(elf, *a)),
            GotSlot::TlsIndex { sym, offset } => format!("got-tls:{sym}+{offset}"),
        };
    }
    describe_addr(elf, t)
}

fn describe_addr(elf: &ElfFile, t: u64) -> String {
    if let Some(s) = elf.symbol_at(t) {
        if s.kind == SymKind::Func {
            return format!("fn:{}+{}", elf.stable_key(s), t - s.addr);
        }
        // Read-only objects are compared by content (a lookup table of strings that changed
        // is a change); writable ones are state and compared by name.
        let ro = elf.sections.get(s.shndx).is_some_and(|x| !x.is_writable() && x.has_bits());
        let k = elf.stable_key(s);
        return if ro { format!("obj:{k}+{}:{}", t - s.addr, ro_fingerprint(elf, s)) } else { format!("obj:{k}+{}", t - s.addr) };
    }
    describe_leaf(elf, t)
}

/// What an address is, without looking into objects (no recursion).
pub(super) fn describe_leaf(elf: &ElfFile, t: u64) -> String {
    if let Some(s) = elf.symbol_at(t) {
        return format!("{}:{}+{}", if s.kind == SymKind::Func { "fn" } else { "obj" }, elf.stable_key(s), t - s.addr);
    }
    match elf.section_at(t) {
        Some(sec) if !sec.is_writable() && sec.has_bits() => {
            // Anonymous read-only data (string literals, constants): compare the content, up
            // to the next item some code refers to.
            let refs = elf.anon_refs();
            let next = refs[refs.partition_point(|a| *a <= t)..].first().copied().unwrap_or(u64::MAX);
            let end = anon_end(elf, t, sec).min(next).min(t + 256);
            let bytes = elf.read(t, (end - t) as usize).unwrap_or(&[]);
            let text = match bytes.iter().position(|&b| b == 0) {
                Some(n) => &bytes[..=n],
                None => bytes,
            };
            format!("anon:{}:{}", sec.name, hex::encode(text))
        }
        Some(sec) => format!("anon-data:{}+{}", sec.name, t - sec.addr),
        None => format!("abs:{t:#x}"),
    }
}

/// Content of a read-only object with its pointer words replaced by what they point at.
pub(super) fn ro_fingerprint(elf: &ElfFile, s: &Symbol) -> String {
    data_fingerprint(elf, s.addr, s.end())
}

/// Bytes of `[lo, hi)` with every pointer word (a dynamic relocation of a PIE, or an address
/// inside the image of a non-PIE) replaced by what it designates: the same table in two
/// builds has the same fingerprint however far the code moved.
pub(super) fn data_fingerprint(elf: &ElfFile, lo: u64, hi: u64) -> String {
    let bytes = elf.read(lo, (hi - lo) as usize).unwrap_or(&[]);
    let mut h = Sha256::new();
    let mut ptrs: BTreeMap<u64, String> = pointer_words(elf, lo, hi).into_iter().map(|(a, v)| (a, describe_leaf(elf, v))).collect();
    for (a, p) in elf.dyn_pointers.range(lo..hi) {
        let what = match p {
            GotSlot::Local(v) => describe_leaf(elf, *v),
            GotSlot::Symbol(n) => format!("dyn:{n}"),
            GotSlot::TlsIndex { sym, offset } => format!("tls:{sym}+{offset}"),
        };
        ptrs.insert(*a, what);
    }
    let mut i = 0usize;
    while i < bytes.len() {
        let a = lo + i as u64;
        if let Some(what) = ptrs.get(&a) {
            h.update(what.as_bytes());
            i += 8;
        } else {
            h.update([bytes[i]]);
            i += 1;
        }
    }
    hex::encode(&h.finalize()[..8])
}

/// Objects holding pointers (vtables, function tables) differ whenever code moves.
pub(super) fn holds_addresses(elf: &ElfFile, s: &Symbol) -> bool {
    elf.sections.get(s.shndx).is_some_and(|sec| sec.name.starts_with(".data.rel") || sec.name.starts_with(".init_array") || sec.name.starts_with(".fini_array") || sec.name == ".got")
}
