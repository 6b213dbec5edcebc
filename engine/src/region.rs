//! The patch region in the target: its header, which makes the target itself the record of
//! what is applied (so a new `livepatch` process, or an agent restarted after a crash, can
//! report and revert), and how regions are found in `/proc/PID/maps`.
use crate::error::{Error, Result};
use crate::process::{Mapping, MemoryReader};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"LPREGION";
pub const VERSION: u32 = 1;
/// Name of the memfd behind a region: shows as `/memfd:livepatch:<patch id> (deleted)`.
pub const NAME_PREFIX: &str = "livepatch:";
const MAX_HEADER_JSON: u32 = 4 << 20;

/// One redirected entry: the old function's first bytes now jump to `target`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// Live address of the old function's entry.
    pub entry: u64,
    /// Live address of its new code in this region.
    pub target: u64,
    /// The bytes at `entry` before any patch (hex).
    pub original: String,
    /// The bytes at `entry` just before this patch (hex): what revert restores.
    pub previous: String,
    /// Live range of the original function.
    pub old_start: u64,
    pub old_len: u64,
    /// A 2-byte `jmp rel8` (a function shorter than the 5-byte jump) to `target`, a trampoline
    /// in the padding between functions that another entry of the same patch fills.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub short: bool,
}

impl Entry {
    /// How many bytes the jump at `entry` takes.
    pub fn width(&self) -> usize {
        if self.short {
            crate::arch::x86_64::SHORT_JUMP_LEN
        } else {
            crate::arch::x86_64::JUMP_LEN
        }
    }

    /// What the entry held just before this patch (what revert restores).
    pub fn previous_bytes(&self) -> Result<Vec<u8>> {
        decode_field(&self.previous)
    }

    /// The jump this entry writes; `None` when the target is out of reach.
    pub fn jump(&self) -> Option<Vec<u8>> {
        if self.short {
            crate::arch::x86_64::jmp_rel8(self.entry, self.target).map(|b| b.to_vec())
        } else {
            crate::arch::x86_64::jmp_rel32(self.entry, self.target).map(|b| b.to_vec())
        }
    }
}

/// What an old entry (or a trampoline in the padding) holds before the patch, found by
/// [`crate::apply`] and recorded in the header by [`crate::fixup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldEntry {
    pub function: String,
    pub at: u64,
    /// The bytes before any patch.
    pub original: Vec<u8>,
    /// The bytes now (an earlier patch's jump, or the original).
    pub current: Vec<u8>,
    /// A 2-byte jump to the function's trampoline.
    pub short: bool,
}

/// Code carried by the region (for activation checks on revert and stacking).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CodeRange {
    pub name: String,
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub patch_id: String,
    pub bundle_sha256: String,
    pub build_id: String,
    /// Unix time in seconds.
    pub applied_at: u64,
    /// Position in the stack of patches (1 = first).
    pub seq: u32,
    pub base: u64,
    pub len: u64,
    pub entries: Vec<Entry>,
    pub code: Vec<CodeRange>,
    /// Return sites of the old functions with their counterparts in this region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub return_sites: Vec<SiteRecord>,
    /// Direct calls and jumps to the old functions, retargeted to this region's code after
    /// the switch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallRecord>,
    /// Frames moved to this region's code when the patch was applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switched: Vec<crate::watchpoint::FrameSwitch>,
    /// Switched frames left out of `switched` for want of room.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub switched_unrecorded: usize,
    /// The gates of this patch's entries ([`crate::gate`]). Empty: the patch switches by
    /// writing its jumps one after the other, and `ungated` says why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateRecord>,
    /// Live address of the control page (the gates' commit word).
    #[serde(default)]
    pub control: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ungated: Option<String>,
    /// The shared library patched (its path as the process maps it); `None`: the executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
}

/// The rel32 field at `at` of a direct call (or jump) to `name` leads to `target` once
/// retargeted; `original` (before any patch) and `previous` (before this one) are what revert
/// restores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallRecord {
    pub name: String,
    pub at: u64,
    pub target: u64,
    pub original: String,
    pub previous: String,
}

impl CallRecord {
    /// What the field held just before this patch.
    pub fn previous_bytes(&self) -> Result<Vec<u8>> {
        decode_field(&self.previous)
    }

    /// The field's bytes once retargeted (`None`: out of reach).
    pub fn written(&self) -> Option<[u8; 4]> {
        let rel = (self.target as i64).checked_sub(self.at as i64 + 4)?;
        i32::try_from(rel).ok().map(|r| r.to_le_bytes())
    }

    /// Whether the field at `at` holds the retargeted bytes now.
    pub fn retargeted(&self, mem: &dyn MemoryReader) -> bool {
        self.written().is_some_and(|w| mem.read_vec(self.at, 4).ok().as_deref() == Some(&w[..]))
    }
}

/// The gate of one entry, in the region: `[at, at+len)`; the commit word is read and acted on
/// in `[at+1, at+decided)`, the old way starts at `at+old_path`; `depths` gives the words the
/// gate has pushed at each instruction before the old way (for unwinding a parked thread).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GateRecord {
    pub name: String,
    pub entry: u64,
    pub at: u64,
    pub len: u64,
    pub decided: u64,
    pub old_path: u64,
    pub depths: Vec<(u32, u8)>,
}

impl GateRecord {
    /// Words pushed by the gate when a thread stands at `pc` in it (`None`: not in its waiting
    /// part).
    pub fn depth_at(&self, pc: u64) -> Option<u8> {
        let off = pc.checked_sub(self.at).filter(|o| *o < self.old_path)? as u32;
        self.depths.iter().rev().find(|(o, _)| *o <= off).map(|(_, d)| *d)
    }

    /// The jump an entry holds while it leads to this gate.
    pub fn jump(&self) -> Option<Vec<u8>> {
        crate::arch::x86_64::jmp_rel32(self.entry, self.at).map(|b| b.to_vec())
    }
}

/// Bytes the header keeps in hex.
fn decode_field(hex_bytes: &str) -> Result<Vec<u8>> {
    hex::decode(hex_bytes).map_err(|_| Error::Other("corrupt region header".into()))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A frame of the old function `name` stopped at `old` (a live return address) continues at
/// `new` in this region; with `back`, a frame at `new` can return to `old` (revert).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteRecord {
    pub name: String,
    pub old: u64,
    pub new: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub back: bool,
    /// Callee-saved registers a frame switched to `new` gets (constants of the new code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<RegValue>,
    /// The same for a frame switched back to `old`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub back_sets: Vec<RegValue>,
    /// Values the new code keeps elsewhere than the old one: moved when a frame is switched to
    /// `new` (and, `back_moves`, back to `old`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<crate::bundle::Move>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub back_moves: Vec<crate::bundle::Move>,
    /// The frame's CFA minus the stack pointer at `old` and `new`.
    #[serde(default)]
    pub cfa_above_sp: i64,
}

/// Register `reg` (DWARF number) gets `value`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegValue {
    pub reg: u16,
    pub value: u64,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("header serialises");
        let mut v = Vec::with_capacity(16 + json.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&(json.len() as u32).to_le_bytes());
        v.extend_from_slice(&json);
        v
    }

    pub fn decode(mem: &dyn MemoryReader, base: u64) -> Result<Header> {
        let mut head = [0u8; 16];
        mem.read(base, &mut head)?;
        if &head[..8] != MAGIC {
            return Err(Error::Other(format!("no livepatch region header at {base:#x}")));
        }
        let version = u32::from_le_bytes(head[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(Error::Other(format!("region at {base:#x} has header version {version}, this livepatch reads {VERSION}")));
        }
        let len = u32::from_le_bytes(head[12..16].try_into().unwrap());
        if len > MAX_HEADER_JSON {
            return Err(Error::Other(format!("region header at {base:#x} is implausibly large")));
        }
        let json = mem.read_vec(base + 16, len as usize)?;
        serde_json::from_slice(&json).map_err(|e| Error::Other(format!("region header at {base:#x} is unreadable: {e}")))
    }

    pub fn contains_code(&self, pc: u64) -> Option<&CodeRange> {
        self.code.iter().find(|c| pc >= c.start && pc < c.start + c.len)
    }
}

/// Mappings that are livepatch regions.
pub fn region_mappings(maps: &[Mapping]) -> Vec<&Mapping> {
    maps.iter().filter(|m| m.offset == 0 && m.path.starts_with("/memfd:") && m.path[7..].starts_with(NAME_PREFIX)).collect()
}

/// Read every region's header, ordered by stack position. A region's mapping spans its
/// read+execute part and its control page (two mappings of the same memfd, back to back).
pub fn read_all(mem: &dyn MemoryReader, maps: &[Mapping]) -> Vec<(Result<Header>, Mapping)> {
    let whole = |m: &Mapping| {
        let mut m = m.clone();
        while let Some(next) = maps.iter().find(|n| n.start == m.end && n.path == m.path && n.offset == m.end - m.start) {
            m.end = next.end;
        }
        m
    };
    let mut v: Vec<(Result<Header>, Mapping)> = region_mappings(maps).into_iter().map(|m| (Header::decode(mem, m.start), whole(m))).collect();
    v.sort_by_key(|(h, m)| (h.as_ref().map(|h| h.seq).unwrap_or(u32::MAX), m.start));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Snapshot;

    #[test]
    fn header_roundtrip_through_memory() {
        let h = Header {
            patch_id: "lp-1".into(),
            bundle_sha256: "ab".into(),
            build_id: "cd".into(),
            applied_at: 1,
            seq: 2,
            base: 0x10000,
            len: 0x3000,
            entries: vec![Entry { name: "f".into(), entry: 0x1000, target: 0x12000, original: "5548".into(), previous: "5548".into(), old_start: 0x1000, old_len: 10, short: false }],
            code: vec![CodeRange { name: "f".into(), start: 0x12000, len: 10 }],
            return_sites: vec![SiteRecord { name: "f".into(), old: 0x10010, new: 0x12010, back: true, sets: vec![RegValue { reg: 13, value: 0x13000 }], back_sets: vec![], moves: vec![], back_moves: vec![], cfa_above_sp: 48 }],
            calls: vec![CallRecord { name: "f".into(), at: 0x10100, target: 0x12000, original: "00000000".into(), previous: "00000000".into() }],
            switched: vec![],
            switched_unrecorded: 0,
            gates: vec![GateRecord { name: "f".into(), entry: 0x1000, at: 0x12100, len: 180, decided: 25, old_path: 167, depths: vec![(0, 0), (1, 1), (13, 0), (26, 1)] }],
            control: 0x13000,
            ungated: None,
            library: None,
        };
        let mem = Snapshot(vec![(0x10000, h.encode())]);
        assert_eq!(Header::decode(&mem, 0x10000).unwrap(), h);
        assert!(h.contains_code(0x12009).is_some());
        assert!(h.contains_code(0x1200a).is_none());
        let g = &h.gates[0];
        assert_eq!((g.depth_at(0x12100), g.depth_at(0x12105), g.depth_at(0x12100 + 13), g.depth_at(0x12100 + 30), g.depth_at(0x12100 + 167)), (Some(0), Some(1), Some(0), Some(1), None));
        let bad = Snapshot(vec![(0x10000, b"LPREGIOX\x01\0\0\0\0\0\0\0".to_vec())]);
        assert!(Header::decode(&bad, 0x10000).is_err());
    }
}
