//! Extract: compare two executables and turn the changed functions of the new one into a
//! patch [`bundle`](crate::bundle).
//!
//! Functions are compared with their address references masked and replaced by what they
//! refer to (a symbol, a PLT entry, the content of a string literal), so a function is not
//! "changed" only because addresses moved. The bundle keeps NEW's layout: every carried piece
//! (function or read-only data) sits at its NEW address inside a *mirror* of NEW's address
//! range, so references between carried pieces (calls between patched functions, relative
//! jump tables, alignment of SIMD constants) need no fixing. Only references that leave the
//! mirror get a [`Fixup`].
use crate::arch::x86_64::{self, CodeRef, RefKind, JUMP_LEN};
use crate::bundle::*;
use crate::elf::{ElfFile, GotSlot, SymKind, Symbol};
use crate::error::{Error, RefusalKind, Result};
use goblin::elf::reloc::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};

const PAGE: u64 = 4096;
/// How much anonymous read-only data (string literals, jump tables) one reference carries at most.
const MAX_ANON_CHUNK: u64 = 4096;

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

impl SourceExplanation {
    /// The functions left out for `why`.
    pub fn not_patched_for(&self, why: Why) -> Vec<&str> {
        self.not_patched.iter().filter(|e| e.why == why).map(|e| e.name.as_str()).collect()
    }
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

impl Diff {
    /// Data changes that make a live update impossible.
    pub fn layout_refusals(&self) -> Vec<&DataChange> {
        self.changed_data.iter().filter(|d| d.writable && d.old_size.is_some_and(|o| o != d.new_size)).collect()
    }
}

/// One side of the comparison: an executable with its symbols indexed by key.
struct Side<'a> {
    elf: &'a ElfFile,
    by_key: HashMap<String, &'a Symbol>,
    by_name: HashMap<&'a str, Vec<&'a Symbol>>,
}

impl<'a> Side<'a> {
    fn new(elf: &'a ElfFile) -> Self {
        let mut by_key = HashMap::new();
        let mut by_name: HashMap<&str, Vec<&Symbol>> = HashMap::new();
        for s in &elf.symbols {
            by_key.entry(s.key()).or_insert(s);
            by_name.entry(s.name.as_str()).or_default().push(s);
        }
        Side { elf, by_key, by_name }
    }

    /// The counterpart of `s` (from the other file) in this file.
    fn matching(&self, s: &Symbol) -> Option<&'a Symbol> {
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

/// Address references of a function, with `--emit-relocs` information folded in.
fn function_refs(elf: &ElfFile, f: &Symbol) -> Result<Vec<CodeRef>> {
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

fn relocs_in(elf: &ElfFile, lo: u64, hi: u64) -> &[crate::elf::Reloc] {
    let a = elf.relocs.partition_point(|r| r.at < lo);
    let b = elf.relocs.partition_point(|r| r.at < hi);
    &elf.relocs[a..b]
}

fn is_absolute(k: RefKind) -> bool {
    matches!(k, RefKind::Abs32 | RefKind::Abs32S | RefKind::Abs64)
}

/// A description of what a reference points at, independent of where things were placed.
fn describe(elf: &ElfFile, f: &Symbol, r: &CodeRef) -> String {
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

/// Pointer words inside read-only data of a non-PIE file (PIE files keep such data in
/// writable, relocated sections): 8-byte aligned values inside the image.
fn pointer_words(elf: &ElfFile, lo: u64, hi: u64) -> Vec<(u64, u64)> {
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

/// Content of a read-only object with its pointer words replaced by what they point at.
fn ro_fingerprint(elf: &ElfFile, s: &Symbol) -> String {
    data_fingerprint(elf, s.addr, s.end())
}

/// Bytes of `[lo, hi)` with every pointer word (a dynamic relocation of a PIE, or an address
/// inside the image of a non-PIE) replaced by what it designates: the same table in two
/// builds has the same fingerprint however far the code moved.
fn data_fingerprint(elf: &ElfFile, lo: u64, hi: u64) -> String {
    let bytes = elf.read(lo, (hi - lo) as usize).unwrap_or(&[]);
    let mut h = Sha256::new();
    let mut ptrs: BTreeMap<u64, String> = pointer_words(elf, lo, hi).into_iter().map(|(a, v)| (a, describe_leaf(elf, v))).collect();
    for (a, p) in elf.dyn_pointers.range(lo..hi) {
        let what = match p {
            GotSlot::Local(v) => describe_leaf(elf, *v),
            GotSlot::Symbol(n) => format!("dyn:{n}"),
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

/// A PIE jump table of `f` at `t`: 32-bit offsets from the table to targets inside `f`
/// (`lea table(%rip); movslq (table,idx,4); add; jmp *`). Its bytes change whenever the code
/// moves; what it means is the list of targets as offsets into `f`.
fn relative_jump_table(elf: &ElfFile, f: &Symbol, t: u64) -> Option<Vec<u64>> {
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

/// What an address is, without looking into objects (no recursion).
fn describe_leaf(elf: &ElfFile, t: u64) -> String {
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

/// End of the anonymous chunk starting at `t`: the next symbol, the section end, or a cap.
fn anon_end(elf: &ElfFile, t: u64, sec: &crate::elf::Section) -> u64 {
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
fn is_tcb_field(tpoff: i64) -> bool {
    (0..0x1000).contains(&tpoff)
}

fn tls_symbol(elf: &ElfFile, tpoff: i64) -> Option<(&Symbol, i64)> {
    let tls = elf.tls.as_ref()?;
    elf.symbols.iter().filter(|s| s.kind == SymKind::Tls).find_map(|s| {
        let start = tls.tpoff(tls_offset(tls, s.addr));
        (tpoff >= start && tpoff < start + s.size.max(1) as i64).then(|| (s, tpoff - start))
    })
}

/// Whether every thread-local variable of NEW that OLD has sits at the same offset, and the
/// blocks have the same size (so thread-pointer offsets mean the same in both).
fn same_tls_layout(old: &ElfFile, new: &ElfFile) -> bool {
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

/// TLS symbol values are offsets in the TLS template in linked files; tolerate absolute ones.
fn tls_offset(tls: &crate::elf::Tls, value: u64) -> u64 {
    if value < tls.memsz || tls.vaddr == 0 {
        value
    } else {
        value.saturating_sub(tls.vaddr)
    }
}

/// Normalised form of a function: code with reference fields zeroed, plus what they point at.
fn normalise(elf: &ElfFile, f: &Symbol) -> Result<(Vec<u8>, Vec<String>)> {
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

fn has_reference_relocs(elf: &ElfFile) -> bool {
    !elf.relocs.is_empty()
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
                    if std::env::var_os("LIVEPATCH_DEBUG_DIFF").is_some() {
                        for (a, b) in on.1.iter().zip(nn.1.iter()).filter(|(a, b)| a != b).take(3) {
                            eprintln!("{}: {a} != {b}", nf.name);
                        }
                        if on.0 != nn.0 {
                            eprintln!("{}: masked code differs", nf.name);
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

/// Objects holding pointers (vtables, function tables) differ whenever code moves.
fn holds_addresses(elf: &ElfFile, s: &Symbol) -> bool {
    elf.sections.get(s.shndx).is_some_and(|sec| sec.name.starts_with(".data.rel") || sec.name.starts_with(".init_array") || sec.name.starts_with(".fini_array") || sec.name == ".got")
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

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Only these functions (by name); empty means every changed function.
    pub functions: Vec<String>,
    /// When the update cannot be applied live, still write a bundle that records why (no
    /// code); applying it refuses and asks for an offline restart.
    pub record_refusal: bool,
    /// Take the changed set from this source diff instead of from every machine-code difference.
    pub source: Option<SourceInput>,
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

/// Build a bundle patching OLD into NEW.
pub fn build(old: &ElfFile, new: &ElfFile, opts: &BuildOptions) -> Result<(Manifest, Vec<u8>, Diff)> {
    // The diff once: the refusal path records from it too.
    let d = diff_with_source(old, new, opts.source.as_ref())?;
    match build_live(old, new, opts, &d) {
        Ok((manifest, blob)) => Ok((manifest, blob, d)),
        Err(Error::Refused { kind, reason, restart_required: true }) if opts.record_refusal => {
            let build_id = old.build_id_hex().ok_or_else(|| Error::Elf { path: old.path.clone(), msg: "has no GNU build id".into() })?;
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                arch: "x86_64".into(),
                target: TargetId { build_id, path: Some(old.path.display().to_string()), pie: old.pie },
                new_build_id: new.build_id_hex(),
                created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                reference_source: d.reference_source.clone(),
                span: Span { lo: 0, len: 0 },
                pieces: vec![],
                functions: vec![],
                fixups: vec![],
                changed_data: d.changed_data.clone(),
                refusal: Some(reason),
                refusal_kind: Some(kind),
                detours: vec![],
            };
            Ok((manifest, Vec::new(), d))
        }
        Err(e) => Err(e),
    }
}

fn build_live(old: &ElfFile, new: &ElfFile, opts: &BuildOptions, d: &Diff) -> Result<(Manifest, Vec<u8>)> {
    let build_id = old.build_id_hex().ok_or_else(|| Error::Elf {
        path: old.path.clone(),
        msg: "has no GNU build id; link with -Wl,--build-id so a bundle can be tied to it".into(),
    })?;
    if let Some(t) = d.changed_types.first() {
        return Err(Error::refused_kind(
            RefusalKind::DataLayout,
            format!(
                "data layout changed: {} ({}){}; objects of it may already live in the process, a live update cannot convert them, an offline restart is needed",
                t.name,
                t.summary,
                if d.changed_types.len() > 1 { format!(" (and {} more types)", d.changed_types.len() - 1) } else { String::new() }
            ),
        ));
    }
    if let Some(dc) = d.layout_refusals().first() {
        return Err(Error::refused_kind(RefusalKind::DataLayout, format!(
            "data layout changed: variable `{}` {}; a live update cannot convert the state of a running process, an offline restart is needed",
            dc.name, dc.note
        )));
    }
    let selected: Vec<String> = if !opts.functions.is_empty() {
        for name in &opts.functions {
            if !d.changed_functions.iter().any(|c| &c.name == name) {
                let exists = new.functions().any(|f| &f.name == name);
                return Err(Error::Other(if exists {
                    format!("function `{name}` did not change between the two executables")
                } else {
                    format!("function `{name}` is not in {}", new.path.display())
                }));
            }
        }
        opts.functions.clone()
    } else if let Some(src) = &d.source {
        src.patched.iter().map(|c| c.name.clone()).collect()
    } else {
        d.changed_functions.iter().map(|c| c.name.clone()).collect()
    };
    if let (true, Some(src)) = (selected.is_empty(), &d.source) {
        let same = src.not_patched_for(Why::SameCode).len();
        let unexplained = src.not_patched_for(Why::NoChangedLine);
        let why = if !src.lines_without_code.is_empty() && !unexplained.is_empty() {
            format!(
                "the fix's changed lines produced no code ({}: a macro, type or declaration?) and these functions differ without a changed line: {}; if the fix changes a macro or constant they use, name them with --function",
                src.lines_without_code.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                unexplained.join(", ")
            )
        } else if same > 0 {
            format!("the fix's changed lines compile to the same machine code as before in {same} function(s) of this build (the running code already behaves as fixed)")
        } else if !src.files_not_compiled.is_empty() && src.lines_without_code.is_empty() {
            format!("the fix changes only files not compiled into this executable ({})", src.files_not_compiled.join(", "))
        } else {
            "no function holds code of a changed source line".to_string()
        };
        return Err(Error::NothingToPatch(format!("{why}; see `livepatch diff --source-diff` for what differs and why")));
    }
    if selected.is_empty() {
        return Err(Error::NothingToPatch("no function changed between the two executables".into()));
    }
    let mut b = Builder::new(old, new, &d);
    for name in &selected {
        let nf = new.functions().find(|f| &f.name == name).expect("changed function exists");
        let kind = if d.added_functions.iter().any(|a| &a.name == name) { FunctionKind::Added } else { FunctionKind::Changed };
        b.include(nf, kind);
        // Split-off cold parts travel with their function.
        let cold = format!("{name}.cold");
        for c in new.functions().filter(|c| c.name == cold || c.name.starts_with(&format!("{cold}."))) {
            b.include(c, FunctionKind::Companion);
        }
    }
    b.run()?;
    b.finish(TargetId { build_id, path: Some(old.path.display().to_string()), pie: old.pie })
}

struct Builder<'a> {
    old: &'a ElfFile,
    new: &'a ElfFile,
    o: Side<'a>,
    diff: &'a Diff,
    /// Functions carried, by NEW address.
    funcs: BTreeMap<u64, (&'a Symbol, FunctionKind)>,
    queue: Vec<u64>,
    /// Read-only chunks carried: start -> end (NEW SVMAs).
    rodata: BTreeMap<u64, u64>,
    /// Anonymous items whose pointer words were already bound.
    anon_scanned: BTreeSet<u64>,
    fixups: Vec<Fixup>,
    detours: Vec<Detour>,
}

impl<'a> Builder<'a> {
    fn new(old: &'a ElfFile, new: &'a ElfFile, diff: &'a Diff) -> Self {
        Builder { old, new, o: Side::new(old), diff, funcs: BTreeMap::new(), queue: Vec::new(), rodata: BTreeMap::new(), anon_scanned: BTreeSet::new(), fixups: Vec::new(), detours: Vec::new() }
    }

    fn include(&mut self, f: &'a Symbol, kind: FunctionKind) {
        if let Some(e) = self.funcs.get_mut(&f.addr) {
            if kind == FunctionKind::Changed {
                e.1 = kind;
            }
            return;
        }
        self.funcs.insert(f.addr, (f, kind));
        self.queue.push(f.addr);
    }

    fn is_changed(&self, name: &str) -> bool {
        self.diff.changed_functions.iter().any(|c| c.name == name)
    }

    fn run(&mut self) -> Result<()> {
        while let Some(addr) = self.queue.pop() {
            let (f, _) = self.funcs[&addr];
            for r in function_refs(self.new, f)? {
                self.bind(f, &r)?;
            }
        }
        // Relocated absolute words inside carried read-only data (jump tables of non-PIE code).
        let chunks: Vec<(u64, u64)> = self.rodata.iter().map(|(a, b)| (*a, *b)).collect();
        for (lo, hi) in chunks {
            for r in relocs_in(self.new, lo, hi).to_vec() {
                if r.kind == R_X86_64_64 {
                    let t = (r.sym_addr as i64 + r.addend) as u64;
                    let target = self.classify_addr(t, None, &format!("data at {:#x}", r.at))?;
                    self.fixups.push(Fixup { at: r.at, kind: RefKind::Abs64, next_ip: 0, addend: 0, target });
                }
            }
        }
        Ok(())
    }

    /// Decide what one reference of function `f` must point at in the live process.
    fn bind(&mut self, f: &'a Symbol, r: &CodeRef) -> Result<()> {
        let at = f.addr + r.field_off as u64;
        let fix = |target: Target| Fixup { at, kind: r.kind, next_ip: r.next_ip, addend: 0, target };
        if r.kind == RefKind::TpOff32 && r.target == 0 {
            // The thread pointer itself: the code adds offsets to it that only relocations
            // show. They are right as long as every thread-local variable keeps its offset.
            if self.new.relocs.is_empty() && !same_tls_layout(self.old, self.new) {
                return Err(Error::refused_kind(RefusalKind::DataLayout, format!(
                    "function {} computes thread-local addresses and the thread-local layout changed; an offline restart is needed (or build with -Wl,--emit-relocs)",
                    f.name
                )));
            }
            return Ok(());
        }
        if r.kind == RefKind::TpOff32 && is_tcb_field(r.target as i64) {
            // The stack canary (%fs:0x28), the pointer guard (%fs:0x30), the TCB self pointer:
            // fields of the thread control block at ABI-fixed offsets, the same in every process.
            return Ok(());
        }
        if r.kind == RefKind::TpOff32 {
            let (ns, off) = tls_symbol(self.new, r.target as i64).ok_or_else(|| {
                Error::refused_kind(RefusalKind::UnsupportedReference, format!("function {}: thread-local access at {:#x} matches no TLS variable", f.name, r.ip))
            })?;
            let os = self.o.matching(ns).filter(|os| os.size == ns.size).ok_or_else(|| {
                Error::refused_kind(RefusalKind::DataLayout, format!(
                    "function {} uses thread-local variable `{}` which the running executable lacks (or has with another size); an offline restart is needed",
                    f.name, ns.name
                ))
            })?;
            let tls = self.old.tls.as_ref().expect("OLD has the TLS variable, so a TLS segment");
            let value = tls.tpoff(tls_offset(tls, os.addr)) + off;
            if value != r.target as i64 {
                self.fixups.push(fix(Target::TpOff { value, name: ns.name.clone() }));
            }
            return Ok(());
        }
        let t = r.target;
        if f.contains(t) {
            // Internal: the mirror keeps distances; absolute ones (non-PIE) move with it.
            if is_absolute(r.kind) {
                self.fixups.push(fix(Target::Mirror { svma: t }));
            }
            if r.jump_table {
                self.carry_jump_table(f, t)?;
            }
            return Ok(());
        }
        if r.jump_table {
            self.carry_jump_table(f, t)?;
            self.fixups.push(fix(Target::Mirror { svma: t }));
            return Ok(());
        }
        if let Some((_, name)) = self.new.plt_entry(t) {
            let name = name.to_string();
            let target = match self.old.plt_for(&name) {
                Some(p) => Target::Old { svma: p, name: format!("{name}@plt") },
                None if r.is_branch && !r.is_mem => Target::Import { name },
                None => Target::Slot { of: Box::new(Target::Import { name }) },
            };
            self.fixups.push(fix(target));
            return Ok(());
        }
        if let Some(slot) = self.new.got.get(&t).cloned() {
            if !r.is_mem || r.is_lea {
                return Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!("function {} takes the address of a GOT entry at {:#x}", f.name, r.ip)));
            }
            let target = match slot {
                GotSlot::Symbol(name) => match self.old.got_for(&name) {
                    Some(s) => Target::Old { svma: s, name: format!("{name}@got") },
                    None => Target::Slot { of: Box::new(Target::Import { name }) },
                },
                GotSlot::Local(a) => {
                    let inner = self.classify_addr(a, Some(f), &format!("GOT entry used by {}", f.name))?;
                    match &inner {
                        Target::Old { svma, .. } => match self.old.got.iter().find(|(_, v)| matches!(v, GotSlot::Local(x) if x == svma)) {
                            Some((s, _)) => Target::Old { svma: *s, name: "got".into() },
                            None => Target::Slot { of: Box::new(inner) },
                        },
                        _ => Target::Slot { of: Box::new(inner) },
                    }
                }
            };
            self.fixups.push(fix(target));
            return Ok(());
        }
        if let Some(d) = self.library_variable_detour(f, r)? {
            self.detours.push(d);
            return Ok(());
        }
        let target = self.classify_addr(t, Some(f), &format!("function {}", f.name))?;
        match (&target, r.kind) {
            (Target::Mirror { .. }, RefKind::PcRel | RefKind::PcRel8) => {}
            (_, RefKind::PcRel8) => {
                return Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!(
                    "function {}: a short branch at {:#x} leaves the patched code and cannot be redirected",
                    f.name, r.ip
                )))
            }
            _ => self.fixups.push(fix(target)),
        }
        Ok(())
    }

    /// A memory access to a library variable that NEW copies (copy relocation) and OLD does
    /// not: the library's own definition is the live one, reached through a detour.
    fn library_variable_detour(&self, f: &Symbol, r: &CodeRef) -> Result<Option<Detour>> {
        let Some(s) = self.new.symbol_at(r.target).filter(|s| s.kind == SymKind::Object) else { return Ok(None) };
        let Some(lib) = self.new.copies.get(&s.addr) else { return Ok(None) };
        if self.old.copies.values().any(|n| n == lib) {
            return Ok(None);
        }
        if !r.is_mem || r.is_branch || !matches!(r.kind, RefKind::PcRel | RefKind::Abs32S) {
            return Err(Error::refused_kind(
                RefusalKind::UnsupportedReference,
                format!("function {} uses library variable `{lib}` at {:#x} in a way no detour can carry (the running executable has no copy of it); an offline restart is needed", f.name, r.ip),
            ));
        }
        Ok(Some(Detour { at: r.ip, len: r.next_ip - r.ip, symbol: lib.clone(), offset: (r.target - s.addr) as i64 }))
    }

    /// What a NEW address (outside PLT/GOT) is in the live process.
    fn classify_addr(&mut self, t: u64, from: Option<&'a Symbol>, who: &str) -> Result<Target> {
        let new = self.new;
        if let Some(s) = new.symbol_at(t) {
            let off = t - s.addr;
            match s.kind {
                SymKind::Func => {
                    if self.funcs.contains_key(&s.addr) {
                        return Ok(Target::Mirror { svma: t });
                    }
                    match self.o.matching(s) {
                        // Entering another function in the middle is only safe if it did not change.
                        Some(os) if off == 0 || !self.is_changed(&s.name) => {
                            return Ok(Target::Old { svma: os.addr + off, name: s.name.clone() })
                        }
                        Some(_) => {
                            self.include(s, FunctionKind::Companion);
                        }
                        None => self.include(s, FunctionKind::Added),
                    }
                    return Ok(Target::Mirror { svma: t });
                }
                SymKind::Object | SymKind::Tls => {
                    let sec = new.sections.get(s.shndx);
                    let writable = sec.is_some_and(|x| x.is_writable());
                    if let Some(lib) = new.copies.get(&s.addr) {
                        return match self.old.copies.iter().find(|(_, n)| *n == lib) {
                            Some((a, _)) => Ok(Target::Old { svma: a + off, name: lib.clone() }),
                            None => Err(Error::refused_kind(RefusalKind::DataLayout, format!(
                                "{who} uses library variable `{lib}` which the running executable does not copy; an offline restart is needed"
                            ))),
                        };
                    }
                    let os = self.o.matching(s);
                    if writable {
                        return match os {
                            Some(os) if os.size == s.size => Ok(Target::Old { svma: os.addr + off, name: s.name.clone() }),
                            Some(os) => Err(Error::refused_kind(RefusalKind::DataLayout, format!(
                                "data layout changed: {who} uses variable `{}` whose size changed from {} to {} bytes; an offline restart is needed",
                                s.name, os.size, s.size
                            ))),
                            None => Err(Error::refused_kind(RefusalKind::DataLayout, format!(
                                "{who} needs variable `{}` which the running executable lacks in writable memory; new state cannot be added live, an offline restart is needed",
                                s.name
                            ))),
                        };
                    }
                    // Read-only: bind to OLD's copy when identical, else carry NEW's.
                    if let Some(os) = os {
                        if os.size == s.size && ro_fingerprint(self.old, os) == ro_fingerprint(new, s) && !holds_addresses(new, s) {
                            return Ok(Target::Old { svma: os.addr + off, name: s.name.clone() });
                        }
                    }
                    self.carry(s.addr, s.end().max(s.addr + 1), who)?;
                    for (at, v) in pointer_words(new, s.addr, s.end()) {
                        let target = self.classify_addr(v, from, &format!("table `{}`", s.name))?;
                        self.fixups.push(Fixup { at, kind: RefKind::Abs64, next_ip: 0, addend: 0, target });
                    }
                    return Ok(Target::Mirror { svma: t });
                }
            }
        }
        match new.section_at(t) {
            Some(sec) if !sec.is_writable() && sec.has_bits() && !sec.is_exec() => {
                let end = anon_end(new, t, sec);
                self.carry(t, end, who)?;
                // Absolute pointers in the item (a non-PIE jump table at -O0 is read with a
                // plain `mov`): they must follow the code they point at.
                let refs = new.anon_refs();
                let item_end = refs[refs.partition_point(|a| *a <= t)..].first().copied().unwrap_or(end).min(end);
                if self.anon_scanned.insert(t) {
                    for (at, v) in pointer_words(new, t, item_end) {
                        if let Ok(target) = self.classify_addr(v, from, who) {
                            self.fixups.push(Fixup { at, kind: RefKind::Abs64, next_ip: 0, addend: 0, target });
                        }
                    }
                }
                Ok(Target::Mirror { svma: t })
            }
            Some(sec) if sec.is_exec() => {
                let _ = from;
                Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!("{who} refers to code at {t:#x} in {} that belongs to no function", sec.name)))
            }
            Some(sec) => Err(Error::refused_kind(RefusalKind::DataLayout, format!(
                "{who} refers to unnamed writable data at {t:#x} in {}; it cannot be bound to the running process, an offline restart is needed",
                sec.name
            ))),
            None => Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!("{who} refers to {t:#x}, outside the executable"))),
        }
    }

    fn carry(&mut self, lo: u64, hi: u64, who: &str) -> Result<()> {
        if self.new.read(lo, (hi - lo) as usize).is_none() {
            return Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!("{who}: data at {lo:#x} has no bytes in the file")));
        }
        let e = self.rodata.entry(lo).or_insert(hi);
        *e = (*e).max(hi);
        Ok(())
    }

    /// `jmp [table + index*8]` in non-PIE code: carry the table and move its entries.
    fn carry_jump_table(&mut self, f: &'a Symbol, table: u64) -> Result<()> {
        let mut n = 0u64;
        loop {
            let Some(w) = self.new.read(table + n * 8, 8) else { break };
            let v = u64::from_le_bytes(w.try_into().unwrap());
            if !f.contains(v) || n >= 4096 {
                break;
            }
            if self.new.relocs.is_empty() {
                self.fixups.push(Fixup { at: table + n * 8, kind: RefKind::Abs64, next_ip: 0, addend: 0, target: Target::Mirror { svma: v } });
            }
            n += 1;
        }
        if n == 0 {
            return Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!("function {}: jump table at {table:#x} could not be read", f.name)));
        }
        self.carry(table, table + n * 8, &format!("function {}", f.name))
    }

    fn finish(self, target: TargetId) -> Result<(Manifest, Vec<u8>)> {
        let mut pieces = Vec::new();
        let mut blob = Vec::new();
        let mut functions = Vec::new();
        // OLD bytes the jumps of this bundle take (entries, spilled padding, trampolines).
        let mut jump_bytes: Vec<(u64, u64)> = Vec::new();
        for (f, kind) in self.funcs.values() {
            let code = self.new.read(f.addr, f.size as usize).expect("function bytes were read before");
            pieces.push(Piece { name: f.name.clone(), kind: PieceKind::Code, svma: f.addr, len: f.size, blob: blob.len() as u64 });
            blob.extend_from_slice(code);
            let os = if *kind == FunctionKind::Added { None } else { self.o.matching(f) };
            let (old_svma, old_size, old_digest) = match os {
                Some(os) => {
                    let bytes = self.old.read(os.addr, os.size as usize).ok_or_else(|| Error::Elf {
                        path: self.old.path.clone(),
                        msg: format!("function {} has no bytes in the file", os.name),
                    })?;
                    (Some(os.addr), os.size, Some(hex::encode(Sha256::digest(bytes))))
                }
                None if *kind == FunctionKind::Changed => unreachable!("changed functions exist in OLD"),
                None => (None, 0, None),
            };
            let kind = if os.is_none() { FunctionKind::Added } else { *kind };
            let trampoline = if kind == FunctionKind::Changed { self.jump_room(os.unwrap(), &mut jump_bytes)? } else { None };
            let preserve = if kind == FunctionKind::Changed { self.register_contract(os.unwrap(), f)? } else { Vec::new() };
            let return_sites = if kind == FunctionKind::Changed { frames::return_sites(self.old, os.unwrap(), self.new, f) } else { Vec::new() };
            functions.push(Function { name: f.name.clone(), kind, old_svma, old_size, old_digest, new_svma: f.addr, new_size: f.size, preserve, trampoline, return_sites });
        }
        // Merge overlapping read-only chunks, then carry them.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (&lo, &hi) in &self.rodata {
            match merged.last_mut() {
                Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        for (lo, hi) in merged {
            // A chunk overlapping a carried function would be carried twice; functions win.
            if pieces.iter().any(|p| lo < p.svma + p.len && p.svma < hi) {
                return Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!("read-only data at {lo:#x} overlaps patched code")));
            }
            let bytes = self.new.read(lo, (hi - lo) as usize).expect("checked in carry");
            pieces.push(Piece { name: format!("rodata@{lo:#x}"), kind: PieceKind::Rodata, svma: lo, len: hi - lo, blob: blob.len() as u64 });
            blob.extend_from_slice(bytes);
        }
        pieces.sort_by_key(|p| p.svma);
        let lo = pieces.first().map(|p| p.svma).unwrap_or(0) / PAGE * PAGE;
        let hi = pieces.iter().map(|p| p.svma + p.len).max().unwrap_or(0).div_ceil(PAGE) * PAGE;
        let mut fixups = self.fixups;
        fixups.sort_by_key(|x| x.at);
        fixups.dedup_by_key(|x| x.at);
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            arch: "x86_64".into(),
            target,
            new_build_id: self.new.build_id_hex(),
            created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            reference_source: self.diff.reference_source.clone(),
            span: Span { lo, len: hi - lo },
            pieces,
            functions,
            fixups,
            changed_data: self.diff.changed_data.clone(),
            refusal: None,
            refusal_kind: None,
            detours: self.detours,
        };
        Ok((manifest, blob))
    }

    /// Registers the entry thunk must keep for unpatched callers (empty: jump straight in).
    fn register_contract(&self, os: &Symbol, nf: &Symbol) -> Result<Vec<String>> {
        // Only direct callers can rely on the old body's clobbers (IPA-RA), and only for
        // registers they use.
        let callers = self.old.direct_callers(os.addr);
        let used = callers.iter().fold(regs::RegSet::default(), |u, c| u.union(regs::used_by(self.old, c)));
        let extra = regs::RegSet(regs::extra_clobbers(self.old, os, self.new, nf).0 & used.0);
        if extra.is_empty() {
            return Ok(Vec::new());
        }
        let names = extra.names();
        if names.iter().any(|n| n.strip_prefix("xmm").and_then(|x| x.parse::<u32>().ok()).is_some_and(|x| x >= 16)) {
            return Err(Error::refused_kind(
                RefusalKind::RegisterContract,
                format!("the new `{}` clobbers {} which the old one left intact, and the thunk that would keep them for its callers does not handle xmm16-31; patch its callers too (--function) or restart offline", nf.name, names.join(" ")),
            ));
        }
        if let Some(ip) = regs::reads_caller_frame(self.new, nf) {
            let callers = callers.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
            return Err(Error::refused_kind(
                RefusalKind::RegisterContract,
                format!(
                    "the new `{}` clobbers {} which the old one left intact, and it reads its caller's frame (stack arguments or va_start at {ip:#x}), so no thunk can keep those registers for its callers ({}); patch the callers too (--function) or restart offline",
                    nf.name,
                    names.join(" "),
                    if callers.is_empty() { "none called directly".to_string() } else { callers.join(", ") }
                ),
            ));
        }
        Ok(names)
    }

    /// The jump needs JUMP_LEN bytes at the old entry: the function itself or padding after it.
    /// Shorter functions (`-Os` leaves no padding) get a 2-byte `jmp rel8` to a trampoline: 5
    /// bytes of padding between two other functions, within 127 bytes. `used` holds the bytes
    /// this bundle's jumps already take.
    fn jump_room(&self, os: &Symbol, used: &mut Vec<(u64, u64)>) -> Result<Option<u64>> {
        let free = |lo: u64, hi: u64, used: &[(u64, u64)]| !used.iter().any(|(a, b)| lo < *b && *a < hi);
        if os.size >= JUMP_LEN as u64 {
            used.push((os.addr, os.end()));
            return Ok(None);
        }
        let pad_lo = os.end();
        let pad_hi = os.addr + JUMP_LEN as u64;
        // Alignment padding after the function (NOPs of any length, int3, zero fill), up to the
        // next symbol, must hold the rest of the jump.
        let gap_end = self.old.symbols.iter().filter(|s| s.size > 0 && s.addr >= pad_lo).map(|s| s.addr).min().unwrap_or(pad_hi).max(pad_lo);
        let padding_ok = gap_end >= pad_hi
            && self.old.read(pad_lo, (gap_end - pad_lo).min(64) as usize).is_some_and(|b| x::is_padding_run(b, pad_lo) || b[..(pad_hi - pad_lo) as usize].iter().all(|&x| x::is_padding(x)))
            && free(os.addr, pad_hi, used);
        if padding_ok {
            used.push((os.addr, pad_hi));
            return Ok(None);
        }
        if os.size >= x::SHORT_JUMP_LEN as u64 {
            if let Some(t) = self.trampoline_near(os, used) {
                used.push((os.addr, os.end()));
                used.push((t, t + JUMP_LEN as u64));
                return Ok(Some(t));
            }
        }
        Err(Error::refused_kind(RefusalKind::FunctionTooShort, format!(
            "function `{}` is {} bytes long, too short for the {JUMP_LEN}-byte jump; no padding follows it and no 5 bytes of padding between functions lie within the 127-byte reach of a short jump; an offline restart is needed",
            os.name, os.size
        )))
    }

    /// 5 bytes of inter-function padding (only NOPs, `int3` or zero fill, covered by no symbol)
    /// within `jmp rel8` reach of `os`'s entry.
    fn trampoline_near(&self, os: &Symbol, used: &[(u64, u64)]) -> Option<u64> {
        let sec = self.old.section_at(os.addr)?;
        let lo = os.addr.saturating_sub(130).max(sec.addr);
        let hi = (os.addr + 132).min(sec.addr + sec.size);
        let syms: Vec<&Symbol> = self.old.symbols.iter().filter(|s| s.size > 0 && s.end() > lo && s.addr < hi).collect();
        let covered = |a: u64| syms.iter().any(|s| s.contains(a));
        let mut t = lo;
        while t + JUMP_LEN as u64 <= hi {
            let cand = t;
            t += 1;
            if x::jmp_rel8(os.addr, cand).is_none() || (cand..cand + JUMP_LEN as u64).any(covered) {
                continue;
            }
            if used.iter().any(|(a, b)| cand < *b && *a < cand + JUMP_LEN as u64) {
                continue;
            }
            // The whole gap around the candidate must be padding, so no code can jump into it.
            let (mut g0, mut g1) = (cand, cand + JUMP_LEN as u64);
            while g0 > sec.addr && !covered(g0 - 1) && g0 > lo {
                g0 -= 1;
            }
            while g1 < hi && !covered(g1) {
                g1 += 1;
            }
            let Some(bytes) = self.old.read(g0, (g1 - g0) as usize) else { continue };
            if x::is_padding_run(bytes, g0) {
                return Some(cand);
            }
        }
        None
    }
}

use x86_64 as x;

pub mod frames;
pub mod regs;
pub mod source;
pub mod types;

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
