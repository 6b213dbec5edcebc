//! Apply: the whole sequence for one process, in order. Check the target against the bundle,
//! then the steps: [`map`] places the region and maps the image [`fixup`] makes for that place
//! (the target keeps running), [`watchpoint`] stops it when no old code is active (frames at
//! proven return sites excepted), [`jump`] writes the jumps, switches those frames and lets it
//! go. Any failure leaves the target on its previous code and unstopped; the region is unmapped.
use crate::arch::x86_64::{JUMP_LEN, SHORT_JUMP_LEN};
use crate::bundle::Bundle;
use crate::error::{Error, RefusalKind, Result};
use crate::fixup::{self, Layout};
use crate::jump;
use crate::map;
use crate::process::MemoryReader;
use crate::region::OldEntry;
use crate::status;
use crate::target::{Executable, Target};
use crate::watchpoint::{self, Frames, Strategy};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Options {
    pub strategy: Strategy,
    pub timeout: Duration,
    pub frames: Frames,
}

impl Default for Options {
    fn default() -> Self {
        Options { strategy: Strategy::default(), timeout: Duration::from_secs(30), frames: Frames::default() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pid: i32,
    pub patch_id: String,
    pub functions: Vec<String>,
    /// How long every thread of the target was stopped for the switch (microseconds).
    pub pause_us: u64,
    pub strategy: Strategy,
    pub attempts: u32,
    pub waited_ms: u64,
    /// Time to map the region (one thread held for the injected system calls).
    pub map_us: u64,
    pub total_ms: u64,
    pub region: String,
    pub already_applied: bool,
    pub stacked: usize,
    pub restart_recommended: bool,
    /// Frames of old functions stopped at return sites, moved to the new code.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub switched_frames: Vec<watchpoint::FrameSwitch>,
    /// The switch went through the patch's gates (one commit word for every function); when
    /// not, `ungated` says why (its jumps were written one after the other).
    pub gated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ungated: Option<String>,
}

/// Apply `bundle` to process `pid`.
pub fn apply(pid: i32, bundle: &Bundle, opts: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let target = Target::open(pid)?;
    let exe = check(&target, bundle)?;
    let stacked = target.live().len();
    let mut report = Report {
        pid,
        patch_id: bundle.patch_id(),
        functions: bundle.manifest.functions.iter().filter(|f| f.has_entry_jump()).map(|f| f.name.clone()).collect(),
        pause_us: 0,
        strategy: opts.strategy,
        attempts: 0,
        waited_ms: 0,
        map_us: 0,
        total_ms: 0,
        region: String::new(),
        already_applied: true,
        stacked,
        restart_recommended: stacked > status::STACK_LIMIT,
        switched_frames: Vec::new(),
        gated: false,
        ungated: None,
    };
    if target.live().iter().any(|a| a.header.patch_id == report.patch_id) {
        report.total_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }
    target.remove_leftovers();
    let entries = old_entries(&target, &exe, bundle)?;

    let mapped = map::map(&target, &exe, Layout::new(bundle, exe.bias), |layout| fixup::fixup(&target, &exe, bundle, &entries, layout))?;
    report.gated = !mapped.header.gates.is_empty();
    report.ungated = mapped.header.ungated.clone();
    let watched = watchpoint::watch(&target, &exe, bundle, &mapped, opts.strategy, opts.frames, opts.timeout)?;
    let (attempts, waited) = (watched.attempts, watched.waited);
    let switched = jump::jump(&target, mapped, watched)?;

    report.already_applied = false;
    report.pause_us = switched.pause_us;
    report.attempts = attempts;
    report.waited_ms = waited.as_millis() as u64;
    report.map_us = switched.map_us;
    report.region = switched.region;
    report.stacked = stacked + 1;
    report.restart_recommended = report.stacked > status::STACK_LIMIT;
    report.switched_frames = switched.frames;
    report.total_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

/// The bundle fits this process: built against the executable it runs or a library it maps,
/// not a recorded refusal, and no patch is left partly switched.
fn check(target: &Target, bundle: &Bundle) -> Result<Executable> {
    let m = &bundle.manifest;
    let exe = target.object(&m.target.build_id)?;
    if let Some(reason) = &m.refusal {
        return Err(Error::Refused {
            kind: m.refusal_kind.unwrap_or(RefusalKind::Recorded),
            reason: format!("{reason} (recorded when the bundle was built)"),
            restart_required: true,
        });
    }
    target.refuse_partly_switched()?;
    Ok(exe)
}

/// The live old code is what the bundle was built against (digests, with any earlier patch's
/// jump replaced by the bytes it displaced), and what each entry holds now: the entries in the
/// order their jumps are written (a trampoline's 5-byte jump before the 2-byte entry jump).
fn old_entries(target: &Target, exe: &Executable, bundle: &Bundle) -> Result<Vec<OldEntry>> {
    let live = target.live();
    // What an entry held before any patch: an earlier patch's header knows, else it is what is there.
    let original_at = |at: u64, current: &[u8]| -> Vec<u8> {
        live.iter()
            .find_map(|a| a.header.entries.iter().find(|e| e.entry == at).and_then(|e| hex::decode(&e.original).ok()))
            .unwrap_or_else(|| current.to_vec())
    };
    let mut entries = Vec::new();
    for f in &bundle.manifest.functions {
        let Some(old_svma) = f.old_svma else { continue };
        let at = exe.avma(old_svma)?;
        let mut live_code = target.mem.read_vec(at, f.old_size as usize)?;
        let width = if f.trampoline.is_some() { SHORT_JUMP_LEN } else { JUMP_LEN };
        let current = target.mem.read_vec(at, width)?;
        let original = original_at(at, &current);
        let n = live_code.len().min(original.len());
        live_code[..n].copy_from_slice(&original[..n]);
        if Some(hex::encode(Sha256::digest(&live_code))) != f.old_digest {
            return Err(Error::Refused {
                kind: RefusalKind::CodeMismatch,
                reason: format!(
                    "the code of `{}` in process {} differs from the executable the bundle was built against (digest mismatch); the bundle does not fit this process",
                    f.name, target.pid
                ),
                restart_required: false,
            });
        }
        if f.has_entry_jump() {
            if let Some(t) = f.trampoline {
                // The trampoline's 5-byte jump first: padding no thread runs, then the entry.
                let t = exe.avma(t)?;
                let t_current = target.mem.read_vec(t, JUMP_LEN)?;
                entries.push(OldEntry { function: f.name.clone(), at: t, original: original_at(t, &t_current), current: t_current, short: false });
            }
            entries.push(OldEntry { function: f.name.clone(), at, original, current, short: f.trampoline.is_some() });
        }
    }
    Ok(entries)
}
