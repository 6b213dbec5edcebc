//! Reading ELF executables: symbols (with their source file, so same-named static functions
//! stay apart), sections, segments, the build id, the PLT and GOT of the dynamic linker, TLS,
//! and the relocations kept by `--emit-relocs`. All addresses here are *SVMAs*: addresses as
//! the file states them, before any load bias.
use crate::error::{Error, Result};
use goblin::elf::{header, program_header as ph, section_header as sh, sym, Elf};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest ELF file we open (a sanity bound on what the parser is asked to index).
const MAX_ELF_SIZE: u64 = 2 << 30;

/// The bytes of an ELF image: a read-only map of the file ([`ElfFile::open`]), or an image
/// already in memory ([`ElfFile::parse`], e.g. the vdso copied out of a process).
pub enum ElfBytes {
    /// Pages are read from the page cache on first touch, and shared by every `ElfFile` of the
    /// same file. The file must not shrink while mapped: see `docs/safety.md`.
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for ElfBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ElfBytes::Mapped(m) => m,
            ElfBytes::Owned(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SymKind {
    Func,
    Object,
    Tls,
}

#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    /// Source file of a local symbol (from the preceding STT_FILE), to tell apart statics.
    pub file: Option<String>,
    pub addr: u64,
    pub size: u64,
    pub kind: SymKind,
    pub local: bool,
    /// Index of the section the symbol is defined in.
    pub shndx: usize,
}

impl Symbol {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
    pub fn contains(&self, a: u64) -> bool {
        a >= self.addr && a < self.end()
    }
    /// Matching key between two builds: `file:name` for locals, `name` for globals.
    pub fn key(&self) -> String {
        match (&self.file, self.local) {
            (Some(f), true) => format!("{f}:{}", self.name),
            _ => self.name.clone(),
        }
    }
}

/// What the code of a file refers to, from one decoding pass over every function.
#[derive(Debug, Default)]
struct CodeIndex {
    /// Unnamed non-code data referred to, sorted.
    anon_refs: Vec<u64>,
    /// Branch target -> the functions (by address) branching there from outside.
    callers: HashMap<u64, Vec<u64>>,
    /// Branch target -> the rel32 fields (SVMAs) of the `call`/`jmp`/`jcc` that branch there
    /// from outside their own function.
    branch_fields: HashMap<u64, Vec<u64>>,
}

/// Names carried by more than one symbol of the same kind, each with a bit per such kind
/// ([`kind_bit`]). A handful in a real program: only these need their source file in a key.
fn shared_names(symbols: &[Symbol]) -> HashMap<String, u8> {
    let mut seen: HashMap<&str, u8> = HashMap::new();
    let mut shared: HashMap<String, u8> = HashMap::new();
    for s in symbols {
        let bit = kind_bit(s.kind);
        let kinds = seen.entry(&s.name).or_default();
        if *kinds & bit != 0 {
            *shared.entry(s.name.clone()).or_default() |= bit;
        }
        *kinds |= bit;
    }
    shared
}

fn kind_bit(k: SymKind) -> u8 {
    match k {
        SymKind::Func => 1,
        SymKind::Object => 2,
        SymKind::Tls => 4,
    }
}

/// A symbol name without the numbering LTO adds to promoted statics (`foo.lto_priv.3`): the
/// number depends on the partition, not on the program.
pub fn canonical_name(name: &str) -> &str {
    match name.rfind(".lto_priv.") {
        Some(i) if name[i + ".lto_priv.".len()..].bytes().all(|b| b.is_ascii_digit()) => &name[..i],
        _ => name,
    }
}

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    pub flags: u64,
    pub kind: u32,
    pub entsize: u64,
}

impl Section {
    pub fn is_alloc(&self) -> bool {
        self.flags & u64::from(sh::SHF_ALLOC) != 0
    }
    pub fn is_writable(&self) -> bool {
        self.flags & u64::from(sh::SHF_WRITE) != 0
    }
    pub fn is_exec(&self) -> bool {
        self.flags & u64::from(sh::SHF_EXECINSTR) != 0
    }
    pub fn has_bits(&self) -> bool {
        self.kind != sh::SHT_NOBITS
    }
    pub fn contains(&self, a: u64) -> bool {
        self.is_alloc() && a >= self.addr && a < self.addr.saturating_add(self.size)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub flags: u32,
}

/// A relocation kept in the executable by `--emit-relocs`, applying to code or read-only data.
#[derive(Debug, Clone)]
pub struct Reloc {
    /// SVMA of the relocated field.
    pub at: u64,
    pub kind: u32,
    pub addend: i64,
    /// Address of the symbol the relocation names (S).
    pub sym_addr: u64,
    pub sym_name: String,
}

/// What a GOT slot of the executable holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GotSlot {
    /// The address of a dynamic symbol (GLOB_DAT, JUMP_SLOT, 64).
    Symbol(String),
    /// An address inside the executable itself (RELATIVE: the addend is the SVMA).
    Local(u64),
    /// The first word of a thread-local index pair (DTPMOD64, then the offset word), which
    /// general- and local-dynamic TLS code passes to `__tls_get_addr`: the module of `sym`
    /// (empty: this object's own block) and, for this object's own block, the offset the link
    /// wrote in the second word.
    TlsIndex { sym: String, offset: u64 },
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub vaddr: u64,
    pub memsz: u64,
    pub align: u64,
}

impl Tls {
    /// x86-64 variant II: the thread pointer sits right after the TLS block of the executable.
    pub fn tpoff(&self, sym_value: u64) -> i64 {
        let align = self.align.max(1);
        let block = self.memsz.div_ceil(align) * align;
        sym_value as i64 - block as i64
    }
}

pub struct ElfFile {
    pub path: PathBuf,
    pub data: ElfBytes,
    pub pie: bool,
    pub machine: u16,
    pub sections: Vec<Section>,
    pub loads: Vec<Load>,
    pub symbols: Vec<Symbol>,
    pub build_id: Option<Vec<u8>>,
    /// PLT entry start -> dynamic symbol the entry jumps to.
    pub plt: HashMap<u64, String>,
    /// PLT sections as (start, end, entry size).
    pub plt_ranges: Vec<(u64, u64, u64)>,
    pub got: HashMap<u64, GotSlot>,
    /// Every pointer word the dynamic linker writes (RELATIVE, 64, GLOB_DAT), anywhere:
    /// data is compared by what its pointers designate, not by their link-time values.
    pub dyn_pointers: std::collections::BTreeMap<u64, GotSlot>,
    /// Copy relocations: SVMA of the copy -> dynamic symbol.
    pub copies: HashMap<u64, String>,
    pub tls: Option<Tls>,
    /// Relocations kept by `--emit-relocs` against allocated sections, sorted by `at`.
    pub relocs: Vec<Reloc>,
    pub interp: Option<String>,
    /// What the code refers to, from one decoding pass (computed on first use).
    code_index: std::sync::OnceLock<CodeIndex>,
    /// Names that more than one symbol of the same kind carries (a [`kind_bit`] per kind),
    /// for [`ElfFile::stable_key`]; built once from `symbols` at parse time.
    shared_names: HashMap<String, u8>,
}

impl std::fmt::Debug for ElfFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElfFile").field("path", &self.path).field("pie", &self.pie).finish()
    }
}

impl ElfFile {
    /// Open an ELF file, mapped read-only: only the pages parsing and later reads touch are
    /// read from disk.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Elf { path: path.to_owned(), msg };
        let mut file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        let meta = file.metadata().map_err(|e| err(format!("cannot open: {e}")))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        if meta.len() > MAX_ELF_SIZE {
            return Err(err(format!("file is too large ({} bytes)", meta.len())));
        }
        if meta.len() == 0 {
            return Self::parse_bytes(path, ElfBytes::Owned(Vec::new()));
        }
        // SAFETY: memmap2 requires that the file does not change while it is mapped. Nothing
        // in this process writes it. Another process could: the bytes read then change under
        // the parser (which bounds-checks every offset, so the answer is wrong, not an
        // out-of-bounds access), and a truncation makes a later read of the lost pages raise
        // SIGBUS. Running executables cannot be opened for writing (ETXTBSY), and installers
        // and linkers replace files by unlink or rename, which leaves the mapped inode intact;
        // docs/safety.md names the case that remains.
        let data = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(map) => ElfBytes::Mapped(map),
            // A file system that cannot map files: read it whole.
            Err(_) => {
                let mut bytes = Vec::with_capacity(meta.len() as usize);
                std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| err(format!("cannot read: {e}")))?;
                ElfBytes::Owned(bytes)
            }
        };
        Self::parse_bytes(path, data)
    }

    /// Parse an ELF image already in memory (the vdso read out of a process, fuzzing inputs).
    pub fn parse(path: &Path, data: Vec<u8>) -> Result<Self> {
        Self::parse_bytes(path, ElfBytes::Owned(data))
    }

    fn parse_bytes(path: &Path, data: ElfBytes) -> Result<Self> {
        let err = |msg: String| Error::Elf { path: path.to_owned(), msg };
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(err("not an ELF file".into()));
        }
        let elf = Elf::parse(&data).map_err(|e| err(format!("malformed ELF: {e}")))?;
        if !elf.is_64 || !elf.little_endian {
            return Err(err("only 64-bit little-endian ELF files are supported".into()));
        }
        let pie = match elf.header.e_type {
            header::ET_EXEC => false,
            header::ET_DYN => true,
            t => return Err(err(format!("not an executable (ELF type {t})"))),
        };
        let sections: Vec<Section> = elf
            .section_headers
            .iter()
            .map(|s| Section {
                name: elf.shdr_strtab.get_at(s.sh_name).unwrap_or("").to_string(),
                addr: s.sh_addr,
                offset: s.sh_offset,
                size: s.sh_size,
                flags: s.sh_flags,
                kind: s.sh_type,
                entsize: s.sh_entsize,
            })
            .collect();
        let loads: Vec<Load> = elf
            .program_headers
            .iter()
            .filter(|p| p.p_type == ph::PT_LOAD)
            .map(|p| Load { vaddr: p.p_vaddr, memsz: p.p_memsz, offset: p.p_offset, filesz: p.p_filesz, flags: p.p_flags })
            .collect();
        let tls = elf
            .program_headers
            .iter()
            .find(|p| p.p_type == ph::PT_TLS)
            .map(|p| Tls { vaddr: p.p_vaddr, memsz: p.p_memsz, align: p.p_align });
        let interp = elf.interpreter.map(|s| s.to_string());

        // Symbols: the full table when present, else the dynamic one (stripped files).
        let mut symbols = Vec::new();
        let (table, strtab) = if elf.syms.len() > 0 { (&elf.syms, &elf.strtab) } else { (&elf.dynsyms, &elf.dynstrtab) };
        let mut file: Option<String> = None;
        for s in table.iter() {
            let name = strtab.get_at(s.st_name).unwrap_or("");
            let ty = s.st_type();
            if ty == sym::STT_FILE {
                file = Some(name.to_string());
                continue;
            }
            let kind = match ty {
                sym::STT_FUNC | sym::STT_GNU_IFUNC => SymKind::Func,
                sym::STT_OBJECT => SymKind::Object,
                sym::STT_TLS => SymKind::Tls,
                _ => continue,
            };
            let shndx = s.st_shndx;
            if shndx == 0 || shndx >= sections.len() || name.is_empty() {
                continue; // undefined, absolute or common: not placed in this file
            }
            let local = s.st_bind() == sym::STB_LOCAL;
            symbols.push(Symbol {
                name: name.to_string(),
                file: if local { file.clone() } else { None },
                addr: s.st_value,
                size: s.st_size,
                kind,
                local,
                shndx,
            });
        }
        symbols.sort_by(|a, b| a.addr.cmp(&b.addr).then(b.size.cmp(&a.size)));
        let shared_names = shared_names(&symbols);

        let build_id = elf
            .iter_note_sections(&data, Some(".note.gnu.build-id"))
            .and_then(|mut it| it.find_map(|n| n.ok().filter(|n| n.n_type == 3 && n.name == "GNU").map(|n| n.desc.to_vec())))
            .or_else(|| {
                elf.iter_note_headers(&data)
                    .and_then(|mut it| it.find_map(|n| n.ok().filter(|n| n.n_type == 3 && n.name == "GNU").map(|n| n.desc.to_vec())))
            });

        let dynname = |idx: usize| -> String {
            elf.dynsyms.get(idx).and_then(|s| elf.dynstrtab.get_at(s.st_name)).unwrap_or("").to_string()
        };
        let mut got = HashMap::new();
        let mut copies = HashMap::new();
        // Only slots of the GOT are GOT entries: a RELATIVE or 64 relocation also patches
        // pointers inside data (`.data.rel.ro` tables, vtables), which code addresses as data.
        let got_sections: Vec<(u64, u64)> =
            sections.iter().filter(|s| s.name == ".got" || s.name == ".got.plt").map(|s| (s.addr, s.addr.saturating_add(s.size))).collect();
        let in_got = |a: u64| got_sections.iter().any(|(lo, hi)| a >= *lo && a < *hi);
        let mut dyn_pointers = std::collections::BTreeMap::new();
        let mut tls_indexes = Vec::new();
        for r in elf.dynrelas.iter().chain(elf.pltrelocs.iter()).chain(elf.dynrels.iter()) {
            use goblin::elf::reloc::*;
            match r.r_type {
                R_X86_64_GLOB_DAT | R_X86_64_64 if r.r_sym != 0 => {
                    dyn_pointers.insert(r.r_offset, GotSlot::Symbol(dynname(r.r_sym)));
                }
                R_X86_64_RELATIVE => {
                    dyn_pointers.insert(r.r_offset, GotSlot::Local(r.r_addend.unwrap_or(0) as u64));
                }
                _ => {}
            }
            if r.r_type != R_X86_64_COPY && !got_sections.is_empty() && !in_got(r.r_offset) {
                continue;
            }
            match r.r_type {
                R_X86_64_GLOB_DAT | R_X86_64_JUMP_SLOT | R_X86_64_64 if r.r_sym != 0 => {
                    got.insert(r.r_offset, GotSlot::Symbol(dynname(r.r_sym)));
                }
                R_X86_64_RELATIVE => {
                    got.insert(r.r_offset, GotSlot::Local(r.r_addend.unwrap_or(0) as u64));
                }
                R_X86_64_COPY => {
                    copies.insert(r.r_offset, dynname(r.r_sym));
                }
                R_X86_64_DTPMOD64 => tls_indexes.push((r.r_offset, if r.r_sym != 0 { dynname(r.r_sym) } else { String::new() })),
                _ => {}
            }
        }

        // Relocations kept by --emit-relocs (SHT_RELA sections applying to allocated sections).
        let mut relocs = Vec::new();
        for (idx, rs) in elf.shdr_relocs.iter() {
            let Some(rsec) = elf.section_headers.get(*idx) else { continue };
            let target = rsec.sh_info as usize;
            if !sections.get(target).is_some_and(|s| s.is_alloc()) || rsec.sh_flags & u64::from(sh::SHF_ALLOC) != 0 {
                continue; // dynamic relocations are handled above
            }
            for r in rs.iter() {
                let (sym_addr, sym_name) = match elf.syms.get(r.r_sym) {
                    Some(s) => (s.st_value, elf.strtab.get_at(s.st_name).unwrap_or("").to_string()),
                    None => (0, String::new()),
                };
                relocs.push(Reloc { at: r.r_offset, kind: r.r_type, addend: r.r_addend.unwrap_or(0), sym_addr, sym_name });
            }
        }
        relocs.sort_by_key(|r| r.at);

        let mut f = ElfFile {
            path: path.to_owned(),
            pie,
            machine: elf.header.e_machine,
            sections,
            loads,
            symbols,
            build_id,
            plt: HashMap::new(),
            plt_ranges: Vec::new(),
            got,
            dyn_pointers,
            copies,
            tls,
            relocs,
            interp,
            data: ElfBytes::Owned(Vec::new()),
            code_index: std::sync::OnceLock::new(),
            shared_names,
        };
        drop(elf);
        f.data = data;
        for (slot, sym) in tls_indexes {
            let offset = if sym.is_empty() { f.read(slot + 8, 8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes"))) } else { 0 };
            f.got.insert(slot, GotSlot::TlsIndex { sym, offset });
        }
        f.index_plt();
        Ok(f)
    }

    /// Map every PLT entry to the dynamic symbol whose GOT slot it jumps through.
    fn index_plt(&mut self) {
        let plts: Vec<Section> =
            self.sections.iter().filter(|s| matches!(s.name.as_str(), ".plt" | ".plt.sec" | ".plt.got")).cloned().collect();
        for s in plts {
            let ent = if s.entsize >= 8 { s.entsize } else { 16 };
            self.plt_ranges.push((s.addr, s.addr + s.size, ent));
            let Some(code) = self.read(s.addr, s.size as usize) else { continue };
            let code = code.to_vec();
            let mut off = 0u64;
            while off + ent <= s.size {
                let entry = s.addr + off;
                let bytes = &code[off as usize..(off + ent) as usize];
                for r in crate::arch::x86_64::decode_refs(bytes, entry).unwrap_or_default() {
                    if let crate::arch::x86_64::RefKind::PcRel = r.kind {
                        if r.is_mem {
                            if let Some(GotSlot::Symbol(name)) = self.got.get(&r.target) {
                                self.plt.insert(entry, name.clone());
                            }
                        }
                    }
                }
                off += ent;
            }
        }
    }

    /// A name for `s` comparable across builds: the bare name when it is unique in this file,
    /// else qualified by its source file.
    pub fn stable_key(&self, s: &Symbol) -> String {
        let dup = self.shared_names.get(&s.name).is_some_and(|kinds| kinds & kind_bit(s.kind) != 0);
        let key = if dup { s.key() } else { s.name.clone() };
        canonical_name(&key).to_string()
    }

    /// Every address of unnamed, non-code data that some function refers to, sorted. Such
    /// items (string literals, constants, jump tables) are delimited by the next one.
    pub fn anon_refs(&self) -> &[u64] {
        &self.code_index().anon_refs
    }

    /// The functions that call or jump to `target` directly (by a relative branch).
    pub fn direct_callers(&self, target: u64) -> Vec<&Symbol> {
        let Some(callers) = self.code_index().callers.get(&target) else { return Vec::new() };
        callers.iter().filter_map(|a| self.functions().find(|f| f.addr == *a)).collect()
    }

    /// The rel32 fields of the direct branches to `target` from other functions (SVMAs).
    pub fn branch_fields(&self, target: u64) -> &[u64] {
        self.code_index().branch_fields.get(&target).map(|v| v.as_slice()).unwrap_or(&[])
    }

    fn code_index(&self) -> &CodeIndex {
        self.code_index.get_or_init(|| {
            let mut ix = CodeIndex::default();
            for f in self.functions() {
                let Some(code) = self.read(f.addr, f.size as usize) else { continue };
                for r in crate::arch::x86_64::decode_refs(code, f.addr).unwrap_or_default() {
                    if r.kind == crate::arch::x86_64::RefKind::TpOff32 || f.contains(r.target) {
                        continue;
                    }
                    if r.is_branch && !r.is_mem {
                        let c = ix.callers.entry(r.target).or_default();
                        if c.last() != Some(&f.addr) {
                            c.push(f.addr);
                        }
                        if r.kind == crate::arch::x86_64::RefKind::PcRel && r.field_size == 4 {
                            ix.branch_fields.entry(r.target).or_default().push(f.addr + r.field_off as u64);
                        }
                    }
                    if self.symbol_at(r.target).is_none() && self.section_at(r.target).is_some_and(|s| !s.is_exec()) {
                        ix.anon_refs.push(r.target);
                    }
                }
            }
            ix.anon_refs.sort_unstable();
            ix.anon_refs.dedup();
            ix
        })
    }

    /// The page of the lowest loadable segment: where the offset-0 mapping of the file starts,
    /// less the load bias.
    pub fn first_page(&self) -> u64 {
        self.loads.iter().map(|l| l.vaddr).min().unwrap_or(0) & !0xfff
    }

    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.as_ref().map(hex::encode)
    }

    /// Bytes at an SVMA, when they are in the file (not .bss).
    pub fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        let l = self.loads.iter().find(|l| addr >= l.vaddr && end <= l.vaddr + l.filesz)?;
        let off = (addr - l.vaddr + l.offset) as usize;
        self.data.get(off..off.checked_add(len)?)
    }

    pub fn section_at(&self, addr: u64) -> Option<&Section> {
        self.sections.iter().find(|s| s.contains(addr) && !s.name.is_empty())
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The DWARF sections of this file (empty ones where it has none), for gimli.
    pub fn dwarf_sections(&self) -> Result<gimli::DwarfSections<&[u8]>> {
        gimli::DwarfSections::load(|id| -> std::result::Result<&[u8], gimli::Error> { Ok(self.section_data(id.name()).map(|(_, d)| d).unwrap_or(&[])) })
            .map_err(|e| Error::Elf { path: self.path.clone(), msg: format!("cannot read DWARF: {e}") })
    }

    pub fn section_data(&self, name: &str) -> Option<(&Section, &[u8])> {
        let s = self.section(name)?;
        if !s.has_bits() {
            return None;
        }
        let d = self.data.get(s.offset as usize..(s.offset + s.size) as usize)?;
        Some((s, d))
    }

    /// The innermost symbol (of any kind) covering `addr`.
    pub fn symbol_at(&self, addr: u64) -> Option<&Symbol> {
        // Symbols are sorted by address; look back from the first one starting after addr.
        let idx = self.symbols.partition_point(|s| s.addr <= addr);
        self.symbols[..idx].iter().rev().take(64).find(|s| s.contains(addr) && s.kind != SymKind::Tls)
    }

    /// The symbol starting after `addr` in the same section, if any.
    pub fn next_symbol_after(&self, addr: u64) -> Option<&Symbol> {
        let idx = self.symbols.partition_point(|s| s.addr <= addr);
        self.symbols.get(idx)
    }

    pub fn functions(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols.iter().filter(|s| s.kind == SymKind::Func && s.size > 0)
    }

    /// The PLT entry containing `addr`, with its symbol.
    pub fn plt_entry(&self, addr: u64) -> Option<(u64, &str)> {
        let (lo, _, ent) = self.plt_ranges.iter().find(|(lo, hi, _)| addr >= *lo && addr < *hi)?;
        let entry = lo + (addr - lo) / ent * ent;
        self.plt.get(&entry).map(|n| (entry, n.as_str()))
    }

    /// The PLT entry of a dynamic symbol.
    pub fn plt_for(&self, name: &str) -> Option<u64> {
        // Prefer .plt.sec/.plt.got entries (the ones code calls) over lazy .plt ones.
        let mut best: Option<u64> = None;
        for (addr, n) in &self.plt {
            if n == name {
                let sec = self.section_at(*addr).map(|s| s.name.as_str()).unwrap_or("");
                if best.is_none() || sec != ".plt" {
                    best = Some(*addr);
                }
            }
        }
        best
    }

    pub fn got_for(&self, name: &str) -> Option<u64> {
        self.got.iter().find(|(_, s)| matches!(s, GotSlot::Symbol(n) if n == name)).map(|(a, _)| *a)
    }

    /// Lowest and highest SVMA of the loaded image.
    pub fn image_range(&self) -> (u64, u64) {
        let lo = self.loads.iter().map(|l| l.vaddr).min().unwrap_or(0);
        let hi = self.loads.iter().map(|l| l.vaddr + l.memsz).max().unwrap_or(0);
        (lo, hi)
    }

    pub fn is_static(&self) -> bool {
        self.interp.is_none()
    }
}

/// Read the GNU build id of an ELF file without keeping it.
pub fn build_id_of(path: &Path) -> Result<Option<String>> {
    Ok(ElfFile::open(path)?.build_id_hex())
}

#[cfg(test)]
mod tests {
    #[test]
    fn lto_numbering_is_dropped() {
        assert_eq!(super::canonical_name("ngx_signal_handler.lto_priv.0"), "ngx_signal_handler");
        assert_eq!(super::canonical_name("HEX.13.lto_priv.12"), "HEX.13");
        assert_eq!(super::canonical_name("x.lto_priv.a"), "x.lto_priv.a");
        assert_eq!(super::canonical_name("main"), "main");
    }

    /// The index answers what a scan of every symbol answers, for every symbol of a real
    /// executable (this test binary: thousands of symbols, same-named statics among them).
    #[test]
    fn stable_key_index_agrees_with_a_scan() {
        let exe = std::env::current_exe().unwrap();
        let f = super::ElfFile::open(&exe).unwrap();
        let mut shared = 0;
        for s in &f.symbols {
            let dup = f.symbols.iter().filter(|o| o.name == s.name && o.kind == s.kind).take(2).count() > 1;
            shared += usize::from(dup);
            let key = if dup { s.key() } else { s.name.clone() };
            assert_eq!(f.stable_key(s), super::canonical_name(&key), "{s:?}");
        }
        assert!(f.symbols.len() > 1000 && shared > 0, "{} symbols, {shared} sharing a name: not a real test", f.symbols.len());
    }
}
