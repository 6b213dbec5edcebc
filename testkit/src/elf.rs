//! A small ELF reader (x86-64 little endian): sections, symbols, load address, build id. The
//! tests read the files themselves rather than trust the tool's reading of them.

use std::fs;
use std::path::Path;

pub struct Elf {
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub kind: u32,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    pub link: u32,
}

#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    pub value: u64,
    pub size: u64,
    /// STT_* (2 = function, 1 = object, 6 = TLS)
    pub kind: u8,
    pub defined: bool,
}

impl Elf {
    pub fn read(path: &Path) -> Elf {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            data.len() > 64 && &data[..4] == b"\x7fELF",
            "{} is not ELF",
            path.display()
        );
        assert_eq!(data[4], 2, "{} is not ELF64", path.display());
        Elf { data }
    }

    fn u16(&self, o: u64) -> u16 {
        let o = o as usize;
        u16::from_le_bytes(self.data[o..o + 2].try_into().unwrap())
    }
    fn u32(&self, o: u64) -> u32 {
        let o = o as usize;
        u32::from_le_bytes(self.data[o..o + 4].try_into().unwrap())
    }
    fn u64(&self, o: u64) -> u64 {
        let o = o as usize;
        u64::from_le_bytes(self.data[o..o + 8].try_into().unwrap())
    }
    fn cstr(&self, o: u64) -> String {
        let o = o as usize;
        let end = self.data[o..]
            .iter()
            .position(|&b| b == 0)
            .map(|p| o + p)
            .unwrap_or(self.data.len());
        String::from_utf8_lossy(&self.data[o..end]).into_owned()
    }

    /// ET_DYN: a position-independent executable.
    pub fn is_pie(&self) -> bool {
        self.u16(16) == 3
    }

    pub fn sections(&self) -> Vec<Section> {
        let shoff = self.u64(0x28);
        let shentsize = self.u16(0x3a) as u64;
        let shnum = self.u16(0x3c) as u64;
        let shstrndx = self.u16(0x3e) as u64;
        let raw: Vec<(u32, u32, u64, u64, u64, u32)> = (0..shnum)
            .map(|i| {
                let h = shoff + i * shentsize;
                (
                    self.u32(h),
                    self.u32(h + 4),
                    self.u64(h + 0x10),
                    self.u64(h + 0x18),
                    self.u64(h + 0x20),
                    self.u32(h + 0x28),
                )
            })
            .collect();
        let strtab_off = raw.get(shstrndx as usize).map(|r| r.3).unwrap_or(0);
        raw.iter()
            .map(|&(name, kind, addr, offset, size, link)| Section {
                name: self.cstr(strtab_off + name as u64),
                kind,
                addr,
                offset,
                size,
                link,
            })
            .collect()
    }

    /// The symbols of `.symtab`.
    pub fn symbols(&self) -> Vec<Symbol> {
        let secs = self.sections();
        let Some(symtab) = secs.iter().find(|s| s.kind == 2) else {
            return Vec::new();
        };
        let strtab = &secs[symtab.link as usize];
        (0..symtab.size / 24)
            .map(|i| {
                let e = symtab.offset + i * 24;
                Symbol {
                    name: self.cstr(strtab.offset + self.u32(e) as u64),
                    kind: self.data[e as usize + 4] & 0xf,
                    defined: self.u16(e + 6) != 0,
                    value: self.u64(e + 8),
                    size: self.u64(e + 16),
                }
            })
            .collect()
    }

    /// (address in the file's own address space, size) of a defined function.
    pub fn function(&self, name: &str) -> Option<(u64, u64)> {
        self.symbols()
            .into_iter()
            .find(|s| s.kind == 2 && s.defined && s.name == name)
            .map(|s| (s.value, s.size))
    }

    /// The lowest PT_LOAD address, page-aligned.
    pub fn first_load_vaddr(&self) -> u64 {
        let phoff = self.u64(0x20);
        let phentsize = self.u16(0x36) as u64;
        let phnum = self.u16(0x38) as u64;
        (0..phnum)
            .map(|i| phoff + i * phentsize)
            .filter(|&h| self.u32(h) == 1)
            .map(|h| self.u64(h + 0x10))
            .min()
            .unwrap_or(0)
            & !0xfff
    }

    /// The GNU build id, as lowercase hex.
    pub fn build_id(&self) -> Option<String> {
        let sec = self
            .sections()
            .into_iter()
            .find(|s| s.name == ".note.gnu.build-id")?;
        let namesz = self.u32(sec.offset) as u64;
        let descsz = self.u32(sec.offset + 4) as usize;
        let desc = (sec.offset + 12 + ((namesz + 3) & !3)) as usize;
        Some(
            self.data[desc..desc + descsz]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }
}

