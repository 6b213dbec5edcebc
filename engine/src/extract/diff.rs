//! The diff: OLD and NEW compared symbol by symbol (functions by fingerprint, data by size and
//! content, aggregate types by DWARF layout), and, with a source diff, which of the differing
//! functions hold code of a changed line and so make up the patch.
use super::fingerprint::{data_fingerprint, holds_addresses, normalise};
use super::matching::Side;
use super::{source, types};
use crate::bundle::DataChange;
use crate::elf::{ElfFile, SymKind};
use crate::error::{Error, Result};
use serde::Serialize;
use std::collections::BTreeSet;

/// What differs between OLD and NEW.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Diff {
    pub old_build_id: Option<String>,
    pub new_build_id: Option<String>,
    pub changed_functions: Vec<FunctionChange>,
    pub added_functions: Vec<Named>,
    pub removed_functions: Vec<Named>,
    pub changed_data: Vec<DataChange>,
    pub added_data: Vec<Named>,
    pub reference_source: String,
    /// Aggregate types (from DWARF, when both have it) whose layout changed: objects of them
    /// may live in the process, so the update is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_types: Vec<types::TypeChange>,
    /// How the source diff explains the machine-code differences (with `--source-diff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceExplanation>,
}

impl Diff {
    /// Data changes that make a live update impossible.
    pub fn layout_refusals(&self) -> Vec<&DataChange> {
        self.changed_data.iter().filter(|d| d.writable && d.old_size.is_some_and(|o| o != d.new_size)).collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionChange {
    pub name: String,
    pub old_addr: u64,
    pub old_size: u64,
    pub new_addr: u64,
    pub new_size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Named {
    pub name: String,
    pub addr: u64,
    pub size: u64,
}

/// The changed set as the source diff defines it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SourceExplanation {
    /// Functions holding code of changed lines: these are patched.
    pub patched: Vec<Explained>,
    /// Functions whose machine code differs without a changed line in them: compiler choices.
    pub not_patched: Vec<Explained>,
    /// Changed lines that produced no code (macros, declarations, types, comments). A changed
    /// macro changes the functions using it without a changed line in them: check `not_patched`.
    pub lines_without_code: Vec<String>,
    /// Files of the diff not compiled into NEW.
    pub files_not_compiled: Vec<String>,
}

impl SourceExplanation {
    /// The functions left out for `why`.
    pub fn not_patched_for(&self, why: Why) -> Vec<&str> {
        self.not_patched.iter().filter(|e| e.why == why).map(|e| e.name.as_str()).collect()
    }
}

/// One function in or out of the patch, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    pub name: String,
    pub why: Why,
    pub reason: String,
}

/// Why a function is in or out of a patch taken from a source diff (the kind programs act on;
/// `reason` says it for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// Holds code of a changed line: patched.
    ChangedLine,
    /// Calls a patched `.isra`/`.part` clone whose calling convention may have changed: patched.
    CallsClone,
    /// Holds code of a changed line that compiles to the same machine code: not patched.
    SameCode,
    /// Differs without a changed line in it (a compiler choice, or a changed macro): not patched.
    NoChangedLine,
    /// Only in NEW, without a changed line (a compiler-made clone): carried only if called.
    NewWithoutChangedLine,
}

/// A source diff and where NEW's debug info is.
#[derive(Debug, Clone, Default)]
pub struct SourceInput {
    pub changes: Vec<source::FileChange>,
    /// NEW's separate debug file; default: NEW itself, else `/usr/lib/debug/.build-id/xx/yyyy.debug`.
    pub debug_file: Option<std::path::PathBuf>,
}

impl SourceInput {
    pub fn from_diff_file(path: &std::path::Path, debug_file: Option<std::path::PathBuf>) -> Result<SourceInput> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading source diff {}", path.display()), e))?;
        Ok(SourceInput { changes: source::parse_unified_diff(&text)?, debug_file })
    }
}

/// Compare OLD and NEW.
pub fn diff(old: &ElfFile, new: &ElfFile) -> Result<Diff> {
    check_supported(old)?;
    check_supported(new)?;
    let o = Side::new(old);
    let n = Side::new(new);
    let mut d = Diff {
        old_build_id: old.build_id_hex(),
        new_build_id: new.build_id_hex(),
        reference_source: if has_reference_relocs(new) { "emit-relocs".into() } else { "decoded".into() },
        ..Default::default()
    };
    let mut seen_old = BTreeSet::new();
    for nf in new.functions() {
        match o.matching(nf) {
            Some(of) => {
                seen_old.insert(of.addr);
                let (on, nn) = (normalise(old, of)?, normalise(new, nf)?);
                if of.size != nf.size || on != nn {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        for (a, b) in on.1.iter().zip(nn.1.iter()).filter(|(a, b)| a != b).take(3) {
                            tracing::debug!(function = %nf.name, old = %a, new = %b, "reference differs");
                        }
                        if on.0 != nn.0 {
                            tracing::debug!(function = %nf.name, "masked code differs");
                        }
                    }
                    d.changed_functions.push(FunctionChange {
                        name: nf.name.clone(),
                        old_addr: of.addr,
                        old_size: of.size,
                        new_addr: nf.addr,
                        new_size: nf.size,
                    });
                }
            }
            None => d.added_functions.push(Named { name: nf.name.clone(), addr: nf.addr, size: nf.size }),
        }
    }
    for of in old.functions() {
        if !seen_old.contains(&of.addr) && n.matching(of).is_none() {
            d.removed_functions.push(Named { name: of.name.clone(), addr: of.addr, size: of.size });
        }
    }
    for ns in new.symbols.iter().filter(|s| s.kind != SymKind::Func) {
        let writable = new.sections.get(ns.shndx).is_some_and(|s| s.is_writable()) || ns.kind == SymKind::Tls;
        match o.matching(ns) {
            Some(os) if os.size != ns.size => d.changed_data.push(DataChange {
                name: ns.name.clone(),
                old_size: Some(os.size),
                new_size: ns.size,
                writable,
                note: format!("size changed from {} to {} bytes", os.size, ns.size),
            }),
            Some(os) => {
                let ob = old.read(os.addr, os.size as usize);
                let nb = new.read(ns.addr, ns.size as usize);
                if ob != nb && data_fingerprint(old, os.addr, os.end()) != data_fingerprint(new, ns.addr, ns.end()) && !holds_addresses(new, ns) {
                    d.changed_data.push(DataChange {
                        name: ns.name.clone(),
                        old_size: Some(os.size),
                        new_size: ns.size,
                        writable,
                        note: if writable {
                            "initial value changed; the live value is kept".into()
                        } else {
                            "content changed; new code uses the new content".into()
                        },
                    });
                }
            }
            None => d.added_data.push(Named { name: ns.name.clone(), addr: ns.addr, size: ns.size }),
        }
    }
    if let (Some(ol), Some(nl)) = (types::layouts(old)?, types::layouts(new)?) {
        d.changed_types = types::changed(&ol, &nl);
    }
    Ok(d)
}

/// Compare OLD and NEW, and explain the differences with a source diff when one is given.
pub fn diff_with_source(old: &ElfFile, new: &ElfFile, input: Option<&SourceInput>) -> Result<Diff> {
    let mut d = diff(old, new)?;
    if let Some(input) = input {
        let debug = open_debug(new, input)?;
        let sc = source::changed_functions(new, debug.as_ref(), &input.changes)?;
        d.source = Some(explain(new, &d, &sc));
        add_private_convention_callers(new, &mut d);
    }
    Ok(d)
}

/// NEW's debug info: NEW itself when it has `.debug_line`, else the given or build-id file.
fn open_debug(new: &ElfFile, input: &SourceInput) -> Result<Option<ElfFile>> {
    if let Some(p) = &input.debug_file {
        let d = ElfFile::open(p)?;
        if d.build_id.is_some() && d.build_id != new.build_id {
            return Err(Error::Elf { path: p.clone(), msg: format!("is the debug file of another build (build id {}, NEW has {})", d.build_id_hex().unwrap_or_default(), new.build_id_hex().unwrap_or_default()) });
        }
        return Ok(Some(d));
    }
    if new.section(".debug_line").is_some() {
        return Ok(None);
    }
    if let Some(id) = new.build_id_hex().filter(|id| id.len() > 2) {
        let p = std::path::PathBuf::from(format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]));
        if p.exists() {
            return Ok(Some(ElfFile::open(&p)?));
        }
    }
    Err(Error::Elf {
        path: new.path.clone(),
        msg: "has no debug info and no debug file was found: a source diff needs the line table of the new build (build with -g, or pass --debug-file)".into(),
    })
}

fn explain(new: &ElfFile, d: &Diff, sc: &source::SourceChanges) -> SourceExplanation {
    let mut e = SourceExplanation::default();
    let name_at = |a: u64| new.functions().find(|f| f.addr == a).map(|f| f.name.clone());
    let mut in_set = BTreeSet::new();
    for (addr, hit) in &sc.functions {
        let Some(name) = name_at(*addr) else { continue };
        let changed = d.changed_functions.iter().any(|c| c.name == name);
        let added = d.added_functions.iter().any(|c| c.name == name);
        if changed || added {
            in_set.insert(name.clone());
            let inl = if hit.line == 0 { String::new() } else { format!("{}:{} changed", hit.file, hit.line) };
            e.patched.push(Explained { name, why: Why::ChangedLine, reason: if added { format!("new function; {inl}") } else { inl } });
        } else {
            e.not_patched.push(Explained { name, why: Why::SameCode, reason: format!("{}:{} changed, but the machine code is the same", hit.file, hit.line) });
        }
    }
    for c in &d.changed_functions {
        if !in_set.contains(&c.name) {
            e.not_patched.push(Explained { name: c.name.clone(), why: Why::NoChangedLine, reason: "no changed source line in its code: a compiler choice (register allocation, inlining, layout), not patched".into() });
        }
    }
    for a in &d.added_functions {
        if !in_set.contains(&a.name) {
            e.not_patched.push(Explained { name: a.name.clone(), why: Why::NewWithoutChangedLine, reason: "new in NEW without a changed line (a compiler-made clone); carried only if patched code calls it".into() });
        }
    }
    e.lines_without_code = sc.lines_without_code.iter().map(|h| format!("{}:{}", h.file, h.line)).collect();
    e.files_not_compiled = sc.files_not_compiled.clone();
    e
}

/// A clone made by IPA-SRA (`.isra.`) or partial inlining (`.part.`) has a calling convention
/// private to its callers, chosen from its body: when its body changes, callers whose code
/// changed too may pass other values, so they are patched with it.
fn add_private_convention_callers(new: &ElfFile, d: &mut Diff) {
    let Some(src) = d.source.as_ref() else { return };
    let mut selected: Vec<String> = src.patched.iter().map(|e| e.name.clone()).collect();
    let mut i = 0;
    while i < selected.len() {
        let name = selected[i].clone();
        i += 1;
        if !(name.contains(".isra.") || name.contains(".part.")) {
            continue;
        }
        let Some(f) = new.functions().find(|f| f.name == name) else { continue };
        for c in new.direct_callers(f.addr) {
            let changed = d.changed_functions.iter().any(|x| x.name == c.name);
            if changed && !selected.contains(&c.name) && !c.name.contains(".cold") {
                selected.push(c.name.clone());
                if let Some(src) = d.source.as_mut() {
                    src.not_patched.retain(|e| e.name != c.name);
                    src.patched.push(Explained { name: c.name.clone(), why: Why::CallsClone, reason: format!("calls `{name}`, a clone whose private calling convention follows its changed body") });
                }
            }
        }
    }
}

fn has_reference_relocs(elf: &ElfFile) -> bool {
    !elf.relocs.is_empty()
}

fn check_supported(elf: &ElfFile) -> Result<()> {
    if elf.machine != goblin::elf::header::EM_X86_64 {
        return Err(Error::Elf { path: elf.path.clone(), msg: format!("machine {} is not supported (x86-64 only)", elf.machine) });
    }
    if elf.functions().next().is_none() {
        return Err(Error::Elf {
            path: elf.path.clone(),
            msg: "has no function symbols (stripped?); build from the unstripped executable or its debug file".into(),
        });
    }
    Ok(())
}
