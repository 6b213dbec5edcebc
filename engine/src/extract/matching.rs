//! Matching: which symbol of one executable is the counterpart of a symbol of the other. By
//! key (name and source file, so same-named statics stay apart), else by a name unique on the
//! other side, else by the name without the numbers LTO and the compiler append
//! (`f.lto_priv.0`, `counter.1`). Also whether the thread-local variables kept their offsets.
use super::refs::tls_offset;
use crate::elf::{ElfFile, SymKind, Symbol};
use std::collections::HashMap;

/// One side of the comparison: an executable with its symbols indexed by key.
pub(super) struct Side<'a> {
    elf: &'a ElfFile,
    by_key: HashMap<String, &'a Symbol>,
    by_name: HashMap<&'a str, Vec<&'a Symbol>>,
}

impl<'a> Side<'a> {
    pub(super) fn new(elf: &'a ElfFile) -> Self {
        let mut by_key = HashMap::new();
        let mut by_name: HashMap<&str, Vec<&Symbol>> = HashMap::new();
        for s in &elf.symbols {
            by_key.entry(s.key()).or_insert(s);
            by_name.entry(s.name.as_str()).or_default().push(s);
        }
        Side { elf, by_key, by_name }
    }

    /// The counterpart of `s` (from the other file) in this file.
    pub(super) fn matching(&self, s: &Symbol) -> Option<&'a Symbol> {
        let same_kind = |c: &&&Symbol| c.kind == s.kind;
        if let Some(m) = self.by_key.get(&s.key()).filter(|m| m.kind == s.kind) {
            return Some(m);
        }
        if let Some(v) = self.by_name.get(s.name.as_str()) {
            let v: Vec<_> = v.iter().filter(same_kind).collect();
            if v.len() == 1 {
                return Some(v[0]);
            }
        }
        // LTO numbers promoted statics by partition (`f.lto_priv.0` here, `f.lto_priv.1` there).
        let canon = crate::elf::canonical_name(&s.name);
        if canon != s.name {
            let cands: Vec<&Symbol> = self.elf.symbols.iter().filter(|c| c.kind == s.kind && crate::elf::canonical_name(&c.name) == canon).collect();
            if cands.len() == 1 {
                return Some(cands[0]);
            }
        }
        // Static locals are numbered by the compiler (`counter.0`, `counter.1`): match the stem
        // when it is unique on both sides.
        let stem = strip_numeric_suffix(&s.name)?;
        let cands: Vec<&Symbol> = self
            .elf
            .symbols
            .iter()
            .filter(|c| c.kind == s.kind && c.file == s.file && strip_numeric_suffix(&c.name) == Some(stem))
            .collect();
        (cands.len() == 1).then(|| cands[0])
    }
}

fn strip_numeric_suffix(name: &str) -> Option<&str> {
    let (stem, num) = name.rsplit_once('.')?;
    (!num.is_empty() && num.bytes().all(|b| b.is_ascii_digit())).then_some(stem)
}

/// Whether every thread-local variable of NEW that OLD has sits at the same offset, and the
/// blocks have the same size (so thread-pointer offsets mean the same in both).
pub(super) fn same_tls_layout(old: &ElfFile, new: &ElfFile) -> bool {
    match (&old.tls, &new.tls) {
        (None, None) => true,
        (Some(ot), Some(nt)) => {
            let o = Side::new(old);
            ot.tpoff(0) == nt.tpoff(0)
                && new.symbols.iter().filter(|s| s.kind == SymKind::Tls).all(|ns| {
                    o.matching(ns).is_some_and(|os| os.size == ns.size && ot.tpoff(tls_offset(ot, os.addr)) == nt.tpoff(tls_offset(nt, ns.addr)))
                })
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_suffix() {
        assert_eq!(strip_numeric_suffix("counter.0"), Some("counter"));
        assert_eq!(strip_numeric_suffix("counter.12"), Some("counter"));
        assert_eq!(strip_numeric_suffix("main.cold"), None);
        assert_eq!(strip_numeric_suffix("x."), None);
    }
}
