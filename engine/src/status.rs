//! Status: what is applied to a process, read from the process itself (the region headers and
//! the bytes at the old entries), so any `livepatch` process can answer, not only the one that
//! applied.
use crate::arch::x86_64::decode_jump;
use crate::error::Result;
use crate::process::{Mapping, MemoryReader, ProcMem, Process};
use crate::region::{self, Header};
use serde::Serialize;

/// Past this many stacked patches the memory image is messy enough that an offline upgrade
/// to an executable with the fixes built in is recommended.
pub const STACK_LIMIT: usize = 4;

#[derive(Debug, Clone, Serialize)]
pub struct EntryStatus {
    pub name: String,
    pub entry: String,
    pub target: String,
    /// `active` (the entry jumps here), `gated` (it jumps to this patch's gate, which leads
    /// the way the patch's commit word says), `overridden` (a newer patch took it),
    /// `not-jumped`.
    pub state: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatchStatus {
    pub patch_id: String,
    pub seq: u32,
    /// Unix seconds.
    pub applied_at: u64,
    /// The same instant in RFC 3339, UTC (`2024-05-01T12:00:00Z`).
    pub applied_at_rfc3339: String,
    pub bundle_sha256: String,
    pub region: String,
    pub functions: Vec<String>,
    pub entries: Vec<EntryStatus>,
    /// `applied`, `orphan` (mapped but never switched to: a tool died mid-way; harmless,
    /// removed by the next apply or revert), or `interrupted` (a switch through the gates was
    /// given up: its entries lead through the gates to the code they had before; repaired by
    /// the next apply or revert).
    pub state: String,
    /// Direct calls of the old functions that lead straight to this patch's code.
    pub calls_retargeted: usize,
    /// The shared library the patch is for (its path in the process); absent: the executable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    /// Frames of old functions moved to this patch's code when it was applied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub switched: Vec<crate::watchpoint::FrameSwitch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub pid: i32,
    pub build_id: Option<String>,
    pub patches: Vec<PatchStatus>,
    pub stacked: usize,
    pub restart_recommended: bool,
    pub warnings: Vec<String>,
}

/// A region with its parsed header.
pub struct Applied {
    pub header: Header,
    pub mapping: Mapping,
    /// Not in effect: never switched to, or switched back through its gates (`interrupted`).
    pub orphan: bool,
    pub interrupted: bool,
}

/// Every region of the process, ordered oldest first, with orphans identified.
pub fn applied(mem: &dyn MemoryReader, maps: &[Mapping]) -> (Vec<Applied>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut out: Vec<Applied> = Vec::new();
    for (h, m) in region::read_all(mem, maps) {
        match h {
            Ok(header) => out.push(Applied { header, mapping: m, orphan: false, interrupted: false }),
            Err(e) => warnings.push(format!("region at {:#x}: {e}", m.start)),
        }
    }
    let referenced: Vec<bool> = out
        .iter()
        .map(|a| {
            let into_me = |bytes: &[u8], at: u64| decode_jump(at, bytes).is_some_and(|t| t >= a.header.base && t < a.header.base + a.header.len);
            a.header.entries.iter().any(|e| mem.read_vec(e.entry, e.width()).is_ok_and(|b| into_me(&b, e.entry)))
                || out.iter().any(|o| o.header.entries.iter().any(|e| hex::decode(&e.previous).is_ok_and(|b| into_me(&b, e.entry))))
        })
        .collect();
    for (a, r) in out.iter_mut().zip(referenced) {
        // Referenced through gates whose word says (or falls back to) the old code.
        a.interrupted = r && crate::gate::effective_state(mem, &a.header) == Some(crate::arch::x86_64::gate::OLD);
        a.orphan = !r || a.interrupted;
    }
    (out, warnings)
}

/// A patch some of whose entries jump to it while others hold neither its jump nor a newer
/// patch's: a livepatch process died between two jumps (applying or reverting).
pub fn partly_switched(mem: &dyn MemoryReader, a: &Applied) -> bool {
    !a.orphan && a.header.entries.iter().any(|e| entry_state(mem, &a.header, e) == "not-jumped")
}

pub fn entry_state(mem: &dyn MemoryReader, h: &Header, e: &region::Entry) -> &'static str {
    match mem.read_vec(e.entry, e.width()).ok().and_then(|b| decode_jump(e.entry, &b)) {
        Some(t) if t == e.target => "active",
        Some(t) if h.gates.iter().any(|g| g.entry == e.entry && g.at == t) => "gated",
        Some(t) if t < h.base || t >= h.base + h.len => "overridden",
        _ => "not-jumped",
    }
}

pub fn status(pid: i32) -> Result<Status> {
    let proc = Process::open(pid)?;
    let mem = ProcMem::open(pid)?;
    let maps = proc.maps()?;
    let build_id = crate::elf::build_id_of(&proc.exe_path()).ok().flatten();
    let (list, mut warnings) = applied(&mem, &maps);
    let patches: Vec<PatchStatus> = list
        .iter()
        .map(|a| PatchStatus {
            patch_id: a.header.patch_id.clone(),
            seq: a.header.seq,
            applied_at: a.header.applied_at,
            applied_at_rfc3339: rfc3339_utc(a.header.applied_at),
            bundle_sha256: a.header.bundle_sha256.clone(),
            region: format!("{:#x}-{:#x}", a.mapping.start, a.mapping.end),
            functions: a.header.entries.iter().map(|e| e.name.clone()).collect(),
            entries: a
                .header
                .entries
                .iter()
                .map(|e| EntryStatus {
                    name: e.name.clone(),
                    entry: format!("{:#x}", e.entry),
                    target: format!("{:#x}", e.target),
                    state: entry_state(&mem, &a.header, e).into(),
                })
                .collect(),
            state: if a.interrupted {
                "interrupted".into()
            } else if a.orphan {
                "orphan".into()
            } else {
                "applied".into()
            },
            switched: a.header.switched.clone(),
            calls_retargeted: a.header.calls.iter().filter(|c| c.retargeted(&mem)).count(),
            library: a.header.library.clone(),
        })
        .collect();
    for a in list.iter().filter(|a| partly_switched(&mem, a)) {
        warnings.push(format!(
            "patch {} is only partly switched (a livepatch process died while writing its jumps): run `livepatch revert --pid {pid} --all`",
            a.header.patch_id
        ));
    }
    let leaked = crate::map::leaked_memfds(pid).len();
    if leaked > 0 {
        warnings.push(format!("{leaked} descriptor(s) of a livepatch memfd left open by a livepatch process that died; the next apply or revert closes them"));
    }
    let stacked = patches.iter().filter(|p| p.state == "applied").count();
    let restart_recommended = stacked > STACK_LIMIT;
    if restart_recommended {
        warnings.push(format!("{stacked} patches are stacked (more than {STACK_LIMIT}): an offline restart on an executable with the fixes built in is recommended"));
    }
    if let Some(bid) = &build_id {
        for a in list.iter().filter(|a| a.header.library.is_none()) {
            if &a.header.build_id != bid {
                warnings.push(format!("patch {} was built for build id {}, the process runs {bid}", a.header.patch_id, a.header.build_id));
            }
        }
    }
    Ok(Status { pid, build_id, patches, stacked, restart_recommended, warnings })
}

/// Unix seconds as RFC 3339 in UTC, e.g. `2024-05-01T12:00:00Z`.
pub fn rfc3339_utc(unix: u64) -> String {
    let (days, rem) = (unix / 86_400, unix % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_unix_seconds() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z"); // a 400-year leap day
        assert_eq!(rfc3339_utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339_utc(1_714_564_800), "2024-05-01T12:00:00Z");
        assert_eq!(rfc3339_utc(4_102_444_800), "2100-01-01T00:00:00Z"); // 2100 is no leap year
        assert_eq!(rfc3339_utc(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(rfc3339_utc(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn civil_from_days_walks_the_calendar() {
        // Day by day over 1970..2400 the date advances by exactly one calendar day.
        let month_len = |y: i64, m: u32| match m {
            2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let mut prev = civil_from_days(0);
        assert_eq!(prev, (1970, 1, 1));
        for z in 1..(430 * 366) {
            let (y, m, d) = prev;
            let next = if d < month_len(y, m) { (y, m, d + 1) } else if m < 12 { (y, m + 1, 1) } else { (y + 1, 1, 1) };
            let got = civil_from_days(z);
            assert_eq!(got, next, "day {z}");
            prev = got;
        }
    }
}
