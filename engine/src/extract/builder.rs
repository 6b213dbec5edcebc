//! The builder: a bundle from a diff. The selected functions are carried at their NEW
//! addresses; each of their references is bound to what it must reach in the live process
//! (OLD's symbol, the mirror, an import, a slot, a TLS offset, a detour), pulling in the
//! functions and read-only data the mirror must hold; each changed function gets room for its
//! entry jump, the registers its entry thunk keeps, and its return sites. A diff that cannot
//! be applied live becomes an error, or a bundle recording the refusal.
use super::diff::{diff_with_source, Diff, SourceInput, Why};
use super::fingerprint::{holds_addresses, ro_fingerprint};
use super::matching::{same_tls_layout, Side};
use super::refs::{anon_end, function_refs, is_absolute, is_tcb_field, pointer_words, relocs_in, tls_offset, tls_symbol};
use super::{frames, regs};
use crate::arch::x86_64::{self as x, CodeRef, RefKind, JUMP_LEN};
use crate::bundle::*;
use crate::elf::{ElfFile, GotSlot, SymKind, Symbol};
use crate::error::{Error, RefusalKind, Result};
use goblin::elf::reloc::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

const PAGE: u64 = 4096;

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

/// Build a bundle patching OLD into NEW.
pub fn build(old: &ElfFile, new: &ElfFile, opts: &BuildOptions) -> Result<(Manifest, Vec<u8>, Diff)> {
    // The diff once: the refusal path records from it too.
    let d = diff_with_source(old, new, opts.source.as_ref())?;
    let target = target_id(old)?;
    match build_live(old, new, opts, &d, &target) {
        Ok((manifest, blob)) => Ok((manifest, blob, d)),
        Err(Error::Refused { kind, reason, restart_required: true }) if opts.record_refusal => {
            let manifest = Manifest { refusal: Some(reason), refusal_kind: Some(kind), ..base_manifest(target, new, &d) };
            Ok((manifest, Vec::new(), d))
        }
        Err(e) => Err(e),
    }
}

/// The running executable a bundle is for: its build id is what `apply` checks.
fn target_id(old: &ElfFile) -> Result<TargetId> {
    let build_id = old.build_id_hex().ok_or_else(|| Error::Elf {
        path: old.path.clone(),
        msg: "has no GNU build id; link with -Wl,--build-id so a bundle can be tied to it".into(),
    })?;
    Ok(TargetId { build_id, path: Some(old.path.display().to_string()), pie: old.pie })
}

/// A manifest carrying nothing: what every bundle of this diff says, before its code (or its
/// refusal) is added.
fn base_manifest(target: TargetId, new: &ElfFile, d: &Diff) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        arch: "x86_64".into(),
        target,
        new_build_id: new.build_id_hex(),
        created_at: build_time(),
        reference_source: d.reference_source.clone(),
        span: Span { lo: 0, len: 0 },
        pieces: vec![],
        functions: vec![],
        fixups: vec![],
        changed_data: d.changed_data.clone(),
        refusal: None,
        refusal_kind: None,
        detours: vec![],
    }
}

/// The bundle, or the refusal that stops the update being applied live.
fn build_live(old: &ElfFile, new: &ElfFile, opts: &BuildOptions, d: &Diff, target: &TargetId) -> Result<(Manifest, Vec<u8>)> {
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
    b.finish(target.clone())
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
            if let GotSlot::TlsIndex { sym, .. } = &slot {
                // `lea rdi, [rip + x@tlsgd]` (or `@tlsld`) before `call __tls_get_addr`: the
                // same index pair in OLD holds the running module's id and the same offset.
                let old = self.old.got.iter().find(|(_, v)| **v == slot).map(|(a, _)| *a).ok_or_else(|| {
                    Error::refused_kind(RefusalKind::UnsupportedReference, format!(
                        "function {} uses a thread-local variable{} the old object has no index for (new, or moved in the thread-local block); an offline restart is needed",
                        f.name,
                        if sym.is_empty() { String::new() } else { format!(" `{sym}`") }
                    ))
                })?;
                self.fixups.push(fix(Target::Old { svma: old, name: "tls-index".into() }));
                return Ok(());
            }
            if !r.is_mem || r.is_lea {
                return Err(Error::refused_kind(RefusalKind::UnsupportedReference, format!("function {} takes the address of a GOT entry at {:#x}", f.name, r.ip)));
            }
            let target = match slot {
                GotSlot::Symbol(name) => match self.old.got_for(&name) {
                    Some(s) => Target::Old { svma: s, name: format!("{name}@got") },
                    None => Target::Slot { of: Box::new(Target::Import { name }) },
                },
                GotSlot::TlsIndex { .. } => unreachable!("handled above"),
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
            functions.push(Function { name: f.name.clone(), kind, old_svma, old_size, old_digest, new_svma: f.addr, new_size: f.size, preserve, trampoline, return_sites, call_sites: Vec::new() });
        }
        // Direct branches to a changed function from other functions are retargeted to the new
        // code after the switch (no extra jump per call); a branch whose instruction overlaps
        // the bytes an entry jump or a trampoline overwrites stays (that jump serves it).
        let overwritten: Vec<(u64, u64)> = functions
            .iter()
            .filter(|f| f.has_entry_jump())
            .flat_map(|f| {
                let entry = f.old_svma.map(|a| (a, a + crate::arch::x86_64::JUMP_LEN as u64));
                let tramp = f.trampoline.map(|t| (t, t + crate::arch::x86_64::JUMP_LEN as u64));
                entry.into_iter().chain(tramp)
            })
            .collect();
        for f in functions.iter_mut().filter(|f| f.has_entry_jump()) {
            let fields = self.old.branch_fields(f.old_svma.unwrap_or(0));
            // The opcode precedes the field by one byte (call, jmp) or two (jcc).
            f.call_sites = fields.iter().copied().filter(|&x| !overwritten.iter().any(|(lo, hi)| x.saturating_sub(2) < *hi && *lo < x + 4)).collect();
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
        let manifest = Manifest { span: Span { lo, len: hi - lo }, pieces, functions, fixups, detours: self.detours, ..base_manifest(target, self.new, self.diff) };
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

/// Unix seconds of the build, or `SOURCE_DATE_EPOCH` when set (reproducible builds): two builds
/// of the same fix are then the same file, so an emitted manifest's digest does not churn in a
/// GitOps repository.
fn build_time() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}
