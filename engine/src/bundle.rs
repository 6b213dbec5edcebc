//! The patch bundle: a versioned, self-describing file carrying the new code of the changed
//! functions, the read-only data it needs, and every fixup, for one exact target executable.
//!
//! Layout (all integers little-endian):
//! ```text
//! "LPBUNDL\0"  u32 format version  u32 manifest length  manifest (JSON)
//! u64 blob length  blob  sha256(everything before)
//! ```
//! The sha256 of the whole file is what a `LivePatch` spec pins with `sha256` and what a
//! signature signs. The patch id is a digest of what the patch does (see [`Bundle::patch_id`]):
//! rebuilding the same fix elsewhere or later gives another file but the same patch.
use crate::arch::x86_64::RefKind;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"LPBUNDL\0";
pub const FORMAT_VERSION: u32 = 1;
/// Limits that keep a hostile bundle from costing unbounded memory.
pub const MAX_BUNDLE: u64 = 512 << 20;
pub const MAX_MANIFEST: u64 = 64 << 20;
pub const MAX_SPAN: u64 = 1 << 30;
pub const MAX_ITEMS: usize = 1 << 20;
/// Largest old function a bundle may name (its bytes are read from the target to check it).
pub const MAX_FUNCTION: u64 = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetId {
    /// GNU build id (hex) of the executable the bundle applies to.
    pub build_id: String,
    /// Where OLD was on the build machine: information only, not part of the patch id.
    pub path: Option<String>,
    pub pie: bool,
}

/// The range of NEW's addresses mirrored into the region, page aligned.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Span {
    pub lo: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PieceKind {
    Code,
    Rodata,
}

/// Bytes placed at their NEW address inside the mirror.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Piece {
    pub name: String,
    pub kind: PieceKind,
    pub svma: u64,
    pub len: u64,
    /// Offset in the blob.
    pub blob: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    /// Exists in OLD; gets a jump at its old entry.
    Changed,
    /// Only in NEW; reached from other new code.
    Added,
    /// A split-off part (`.cold`) of a changed function: entered by jumps, never by its entry.
    Companion,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    pub kind: FunctionKind,
    /// Old code (SVMA in OLD) for changed and companion functions.
    pub old_svma: Option<u64>,
    pub old_size: u64,
    /// sha256 of the old function bytes, checked against the live process before patching.
    pub old_digest: Option<String>,
    pub new_svma: u64,
    pub new_size: u64,
    /// Caller-saved registers the new body clobbers and the old one left intact: the entry
    /// goes through a thunk that keeps them for callers compiled against the old body (IPA-RA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preserve: Vec<String>,
    /// For an old function shorter than the 5-byte jump: an OLD address in the padding between
    /// functions, within 127 bytes, that takes the 5-byte jump; the entry gets a 2-byte `jmp rel8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trampoline: Option<u64>,
    /// Return addresses of the old function's calls, and where a frame stopped at one continues
    /// in the new function (a function that never returns is switched there, not waited for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub return_sites: Vec<ReturnSite>,
    /// The rel32 fields (SVMAs in OLD) of direct calls and jumps to the old entry from other
    /// functions: retargeted to the new code after the switch, so a call costs no extra jump.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<u64>,
}

/// A return address R of an old function (after one of its calls) and its counterpart R' in
/// the new one, when a frame stopped at R is proven to continue correctly at R'.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReturnSite {
    /// R, SVMA in OLD.
    pub old: u64,
    /// R', SVMA in NEW; `None` when not proven (see `why`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<u64>,
    /// The same proof holds from new to old: revert can switch such a frame back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub back: bool,
    /// Callee-saved registers the switch sets, from constant-making instructions of NEW
    /// (an address hoisted out of a loop: a new string literal, a table).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<RegFromCode>,
    /// The same for a switch back to OLD (instructions of OLD).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub back_sets: Vec<RegFromCode>,
    /// Values the new code keeps elsewhere than the old one (another register allocation),
    /// moved at the switch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<Move>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub back_moves: Vec<Move>,
    /// The frame's CFA minus the stack pointer at R and R' (proven the same): where the frame's
    /// slots are once its callee has returned.
    #[serde(default)]
    pub cfa_above_sp: i64,
    /// Why a frame stopped at R cannot be switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// A place of a stopped frame: a callee-saved register (DWARF number) or a slot of the frame
/// (offset from the CFA, width in bytes).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    Reg(u16),
    Slot { offset: i64, width: u32 },
}

/// The value at `from` (in the frame as the old code left it) goes to `to`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Move {
    pub from: Place,
    pub to: Place,
}

/// Register `reg` (DWARF number) of a switched frame gets the constant the instruction at `at`
/// (SVMA of the code the frame continues in) puts in it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegFromCode {
    pub reg: u16,
    pub at: u64,
}

impl Function {
    pub fn has_entry_jump(&self) -> bool {
        self.kind == FunctionKind::Changed
    }

    /// Bytes the jump takes at the old entry: 5, 2 (a short jump to its trampoline), or 0.
    pub fn entry_jump_len(&self) -> usize {
        match (self.has_entry_jump(), self.trampoline) {
            (false, _) => 0,
            (true, Some(_)) => crate::arch::x86_64::SHORT_JUMP_LEN,
            (true, None) => crate::arch::x86_64::JUMP_LEN,
        }
    }
}

/// What a reference field must point at in the live process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "to", rename_all = "snake_case")]
pub enum Target {
    /// An address in OLD (SVMA); live = svma + load bias.
    Old { svma: u64, name: String },
    /// A NEW address carried in the mirror.
    Mirror { svma: u64 },
    /// A dynamic symbol resolved in the live process (reached through a stub in the region).
    Import { name: String },
    /// An 8-byte slot in the region holding the live address of another target: a GOT entry
    /// that OLD lacks.
    Slot { of: Box<Target> },
    /// A thread-pointer offset of a TLS variable of OLD.
    TpOff { value: i64, name: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fixup {
    /// NEW SVMA of the field.
    pub at: u64,
    pub kind: RefKind,
    /// For pc-relative fields: the NEW SVMA the displacement counts from.
    pub next_ip: u64,
    pub addend: i64,
    pub target: Target,
}

/// An instruction of the new code that reads or writes a library variable the running
/// executable never copied: it is moved to a detour that reaches the library's own definition
/// through an address slot (the library is out of 32-bit reach of the region).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Detour {
    /// NEW SVMA of the instruction.
    pub at: u64,
    pub len: u64,
    /// The library's dynamic symbol.
    pub symbol: String,
    /// Offset of the access inside the variable.
    pub offset: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataChange {
    pub name: String,
    pub old_size: Option<u64>,
    pub new_size: u64,
    pub writable: bool,
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format_version: u32,
    pub arch: String,
    pub target: TargetId,
    pub new_build_id: Option<String>,
    /// Unix seconds of the build: information only, not part of the patch id.
    pub created_at: u64,
    /// Where the references were found: "emit-relocs" or "decoded".
    pub reference_source: String,
    pub span: Span,
    pub pieces: Vec<Piece>,
    pub functions: Vec<Function>,
    pub fixups: Vec<Fixup>,
    pub changed_data: Vec<DataChange>,
    /// Set when the update cannot be applied live (`build --record-refusal`): the bundle
    /// carries no code, and applying it refuses with this reason and asks for an offline
    /// restart, so a cluster can flag exactly the pods that need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The kind of that refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_kind: Option<crate::error::RefusalKind>,
    /// Instructions moved to detours (library variables without a copy in OLD).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detours: Vec<Detour>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub manifest: Manifest,
    pub blob: Vec<u8>,
    /// sha256 of the whole file (hex), as `sha256sum` prints it.
    pub digest: String,
}

impl Bundle {
    /// Short, stable identity of a patch: a digest of what it does, not of the file. It covers
    /// the manifest (target build id, functions with their old addresses, sizes and digests,
    /// pieces, fixups, detours, ...) without what only describes the build (`created_at`, the
    /// build machine's path of the old executable), and the code and data bytes. Two builds of
    /// the same fix have the same id, so applying the second over the first is "already
    /// applied"; their files (`digest`) differ.
    pub fn patch_id(&self) -> String {
        let mut m = serde_json::to_value(&self.manifest).expect("manifest serialises");
        if let serde_json::Value::Object(o) = &mut m {
            o.remove("created_at");
            if let Some(serde_json::Value::Object(t)) = o.get_mut("target") {
                t.remove("path");
            }
        }
        let mut canon = Vec::new();
        canonical_json(&m, &mut canon);
        let mut h = Sha256::new();
        h.update(b"livepatch patch id\0");
        h.update((canon.len() as u64).to_le_bytes());
        h.update(&canon);
        h.update(&self.blob);
        let d = hex::encode(h.finalize());
        format!("lp-{}", &d[..12])
    }

    pub fn piece_bytes(&self, p: &Piece) -> &[u8] {
        &self.blob[p.blob as usize..(p.blob + p.len) as usize]
    }

    pub fn to_bytes(manifest: &Manifest, blob: &[u8]) -> Vec<u8> {
        let json = serde_json::to_vec(manifest).expect("manifest serialises");
        let mut out = Vec::with_capacity(json.len() + blob.len() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
        out.extend_from_slice(blob);
        let d = Sha256::digest(&out);
        out.extend_from_slice(&d);
        out
    }

    pub fn write(manifest: &Manifest, blob: &[u8], path: &Path) -> Result<Bundle> {
        let bytes = Self::to_bytes(manifest, blob);
        std::fs::write(path, &bytes).map_err(|e| Error::io(format!("cannot write bundle {}", path.display()), e))?;
        Self::parse(&bytes)
    }

    pub fn read(path: &Path) -> Result<Bundle> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(format!("cannot open bundle {}", path.display()), e))?;
        if meta.len() > MAX_BUNDLE {
            return Err(Error::Bundle(format!("{} is {} bytes, over the {} byte limit", path.display(), meta.len(), MAX_BUNDLE)));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(format!("cannot read bundle {}", path.display()), e))?;
        Self::parse(&bytes)
    }

    /// Parse and validate a bundle. Never panics; every inconsistency is an error.
    pub fn parse(bytes: &[u8]) -> Result<Bundle> {
        let bad = |m: &str| Error::Bundle(m.to_string());
        if bytes.len() as u64 > MAX_BUNDLE {
            return Err(bad("bundle over the size limit"));
        }
        if bytes.len() < 8 + 4 + 4 + 8 + 32 {
            return Err(bad("file too short to be a bundle (truncated?)"));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a livepatch bundle (bad magic)"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(Error::Bundle(format!("bundle format version {version} is not supported (this livepatch reads version {FORMAT_VERSION})")));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        let actual = Sha256::digest(body);
        if actual.as_slice() != digest {
            return Err(bad("digest mismatch: the bundle is corrupted or truncated"));
        }
        let mlen = u32::from_le_bytes(body[12..16].try_into().unwrap()) as u64;
        if mlen > MAX_MANIFEST || 16 + mlen + 8 > body.len() as u64 {
            return Err(bad("manifest length runs past the end of the bundle"));
        }
        let mend = 16 + mlen as usize;
        let manifest: Manifest =
            serde_json::from_slice(&body[16..mend]).map_err(|e| Error::Bundle(format!("manifest is not valid: {e}")))?;
        let blen = u64::from_le_bytes(body[mend..mend + 8].try_into().unwrap());
        if blen != (body.len() - mend - 8) as u64 {
            return Err(bad("blob length does not match the file size"));
        }
        let blob = body[mend + 8..].to_vec();
        // The file digest is the sha256 of the whole file: what `sha256sum` prints, what a
        // LivePatch pins and a signature signs. The trailer only guards the body against
        // corruption.
        let b = Bundle { manifest, blob, digest: hex::encode(Sha256::digest(bytes)) };
        b.validate()?;
        Ok(b)
    }

    fn validate(&self) -> Result<()> {
        let m = &self.manifest;
        let bad = |m: String| Err(Error::Bundle(m));
        if m.arch != "x86_64" {
            return bad(format!("bundle is for architecture {}, this livepatch handles x86_64", m.arch));
        }
        if m.target.build_id.is_empty() || hex::decode(&m.target.build_id).is_err() {
            return bad("target build id is missing or not hex".into());
        }
        if m.refusal.is_some() {
            if !m.pieces.is_empty() || !m.functions.is_empty() || !m.fixups.is_empty() {
                return bad("a bundle recording a refusal must carry no code".into());
            }
            return Ok(());
        }
        if m.span.len == 0 || m.span.len > MAX_SPAN || m.span.lo % 4096 != 0 || m.span.len % 4096 != 0 || m.span.lo.checked_add(m.span.len).is_none() {
            return bad(format!("span {:#x}+{:#x} is not a sane page-aligned range", m.span.lo, m.span.len));
        }
        if m.pieces.len() > MAX_ITEMS || m.functions.len() > MAX_ITEMS || m.fixups.len() > MAX_ITEMS {
            return bad("too many entries".into());
        }
        let span_end = m.span.lo + m.span.len;
        let in_span = |a: u64, len: u64| a >= m.span.lo && a.checked_add(len).is_some_and(|e| e <= span_end);
        for p in &m.pieces {
            if p.blob.checked_add(p.len).is_none_or(|e| e > self.blob.len() as u64) {
                return bad(format!("piece {} runs past the blob", p.name));
            }
            if !in_span(p.svma, p.len) {
                return bad(format!("piece {} lies outside the span", p.name));
            }
        }
        if m.functions.iter().all(|f| !f.has_entry_jump()) {
            return bad("bundle replaces no function".into());
        }
        for d in &m.detours {
            if !(crate::arch::x86_64::JUMP_LEN as u64..=15).contains(&d.len) || !in_span(d.at, d.len) || !self.covered(d.at, d.len) || d.symbol.is_empty() {
                return bad(format!("detour at {:#x} ({} bytes, `{}`) is not an instruction of the carried code", d.at, d.len, d.symbol));
            }
        }
        for f in &m.functions {
            if !in_span(f.new_svma, f.new_size) || !self.covered(f.new_svma, f.new_size) {
                return bad(format!("function {} has no code in the bundle", f.name));
            }
            if f.kind != FunctionKind::Added && (f.old_svma.is_none() || f.old_digest.is_none()) {
                return bad(format!("function {} lacks its old address or digest", f.name));
            }
            if !f.preserve.is_empty() {
                use crate::extract::regs::RegSet;
                let ok = RegSet::from_names(&f.preserve).is_some_and(|r| r.minus(RegSet::CALLER_SAVED).is_empty() && r.names().iter().all(|n| n.strip_prefix("xmm").is_none_or(|x| x.parse::<u8>().is_ok_and(|x| x < 16))));
                if !ok || f.kind != FunctionKind::Changed {
                    return bad(format!("function {} names registers to preserve that no thunk can keep: {}", f.name, f.preserve.join(" ")));
                }
            }
            if f.old_size > MAX_FUNCTION {
                return bad(format!("function {} claims {} bytes of old code (over the {} byte limit)", f.name, f.old_size, MAX_FUNCTION));
            }
        }
        // Two jumps must never share bytes: old functions that get one may not overlap, nor
        // their trampolines (which must be in reach of their entry's `jmp rel8`).
        use crate::arch::x86_64::{jmp_rel8, JUMP_LEN, SHORT_JUMP_LEN};
        let mut olds: Vec<(u64, u64, &str)> = Vec::new();
        for f in m.functions.iter().filter(|f| f.has_entry_jump()) {
            let Some(a) = f.old_svma else { continue };
            match f.trampoline {
                Some(t) => {
                    if jmp_rel8(a, t).is_none() || f.old_size >= JUMP_LEN as u64 {
                        return bad(format!("function {} has a trampoline at {t:#x} it cannot use", f.name));
                    }
                    olds.push((a, a.saturating_add(f.old_size.max(SHORT_JUMP_LEN as u64)), f.name.as_str()));
                    olds.push((t, t.saturating_add(JUMP_LEN as u64), f.name.as_str()));
                }
                None => olds.push((a, a.saturating_add(f.old_size.max(JUMP_LEN as u64)), f.name.as_str())),
            }
        }
        olds.sort();
        for w in olds.windows(2) {
            if w[1].0 < w[0].1 {
                return bad(format!("functions {} and {} overlap in the old executable", w[0].2, w[1].2));
            }
        }
        for x in &m.fixups {
            let w = match x.kind {
                RefKind::Abs64 => 8,
                RefKind::PcRel8 => 1,
                _ => 4,
            };
            if !self.covered(x.at, w) {
                return bad(format!("fixup at {:#x} is outside the carried code", x.at));
            }
        }
        Ok(())
    }

    /// Whether [a, a+len) lies inside one piece.
    fn covered(&self, a: u64, len: u64) -> bool {
        self.manifest.pieces.iter().any(|p| a >= p.svma && a.checked_add(len).is_some_and(|e| e <= p.svma + p.len))
    }
}

/// JSON with the keys of every object in sorted order, whatever map type serde_json was built
/// with (feature unification must not change a patch id).
fn canonical_json(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("string serialises");
                out.push(b':');
                canonical_json(&o[k], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(x, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalar serialises"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Manifest, Vec<u8>) {
        let blob = vec![0x90u8; 32];
        let m = Manifest {
            format_version: FORMAT_VERSION,
            arch: "x86_64".into(),
            target: TargetId { build_id: "abcd".into(), path: None, pie: true },
            new_build_id: None,
            created_at: 0,
            reference_source: "decoded".into(),
            span: Span { lo: 0x1000, len: 0x1000 },
            pieces: vec![Piece { name: "f".into(), kind: PieceKind::Code, svma: 0x1100, len: 32, blob: 0 }],
            functions: vec![Function {
                name: "f".into(),
                kind: FunctionKind::Changed,
                old_svma: Some(0x1100),
                old_size: 32,
                old_digest: Some("00".into()),
                new_svma: 0x1100,
                new_size: 32,
                preserve: vec![],
                trampoline: None,
                return_sites: vec![],
                call_sites: vec![],
            }],
            fixups: vec![Fixup { at: 0x1101, kind: RefKind::PcRel, next_ip: 0x1105, addend: 0, target: Target::Old { svma: 0x2000, name: "g".into() } }],
            changed_data: vec![],
            refusal: None,
            refusal_kind: None,
            detours: vec![],
        };
        (m, blob)
    }

    #[test]
    fn roundtrip() {
        let (m, blob) = sample();
        let bytes = Bundle::to_bytes(&m, &blob);
        let b = Bundle::parse(&bytes).unwrap();
        assert_eq!(b.manifest, m);
        assert_eq!(b.blob, blob);
        assert!(b.patch_id().starts_with("lp-"));
    }

    #[test]
    fn patch_id_is_what_the_patch_does() {
        let (m, blob) = sample();
        let id = |m: &Manifest, blob: &[u8]| Bundle::parse(&Bundle::to_bytes(m, blob)).unwrap();
        let a = id(&m, &blob);
        assert_eq!(a.patch_id().len(), 15, "{}", a.patch_id());
        // Another build time and another path of the old executable: another file, same patch.
        let mut later = m.clone();
        later.created_at = 1_700_000_000;
        later.target.path = Some("/home/ci/build/cart-v1".into());
        let b = id(&later, &blob);
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.patch_id(), b.patch_id());
        // Anything the patch does changes the id.
        let mut other = blob.clone();
        other[3] = 0xcc;
        assert_ne!(id(&m, &other).patch_id(), a.patch_id(), "code bytes");
        let changes: [fn(&mut Manifest); 6] = [
            |m| m.target.build_id = "abce".into(),
            |m| m.functions[0].old_svma = Some(0x1101),
            |m| m.functions[0].old_digest = Some("01".into()),
            |m| m.functions[0].preserve = vec!["rax".into()],
            |m| m.fixups[0].addend = 4,
            |m| m.detours = vec![Detour { at: 0x1100, len: 7, symbol: "stderr".into(), offset: 0 }],
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut m2 = m.clone();
            change(&mut m2);
            let b2 = Bundle { manifest: m2, blob: blob.clone(), digest: String::new() };
            assert_ne!(b2.patch_id(), a.patch_id(), "change {i}");
        }
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v: serde_json::Value = serde_json::from_str(r#"{"b": [1, {"d": "x", "c": null}], "a": true}"#).unwrap();
        let mut out = Vec::new();
        canonical_json(&v, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"a":true,"b":[1,{"c":null,"d":"x"}]}"#);
    }

    #[test]
    fn truncated_and_corrupted_are_refused() {
        let (m, blob) = sample();
        let bytes = Bundle::to_bytes(&m, &blob);
        for cut in [0, 7, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(Bundle::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        let e = Bundle::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("digest mismatch"), "{e}");
    }

    #[test]
    fn inconsistent_manifest_is_refused() {
        let (mut m, blob) = sample();
        m.pieces[0].len = 64; // past the blob
        let e = Bundle::parse(&Bundle::to_bytes(&m, &blob)).unwrap_err().to_string();
        assert!(e.contains("past the blob"), "{e}");
        let (mut m, blob) = sample();
        m.fixups[0].at = 0x5000;
        let e = Bundle::parse(&Bundle::to_bytes(&m, &blob)).unwrap_err().to_string();
        assert!(e.contains("outside the carried code"), "{e}");
        let (mut m, blob) = sample();
        m.span.len = 0;
        assert!(Bundle::parse(&Bundle::to_bytes(&m, &blob)).is_err());
    }
}
