//! Activation safety: switch only when no thread has old code on its stack or stands inside
//! the bytes the jump overwrites.
//!
//! Two strategies: `wait` stops the process, checks every thread's stack, and if the code is
//! active resumes it and retries with backoff; `trap` (see [`crate::watchpoint::trap`]) leads
//! the old entries to their gates ([`crate::gate`]), so a thread is stopped exactly when it is
//! about to enter old code, and polls until the active frames have left.
use crate::error::{Error, Result};
use crate::process::{Mapping, MemoryReader, ProcMem, Process};
use crate::ptrace::Stopped;
use crate::bundle::{Bundle, FunctionKind};
use crate::gate::{Gated, Way};
use crate::map::Mapped;
use crate::target::{Executable, Target};
use crate::unwind::{self, Modules, Stack};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Stop, check the stacks, resume and retry with backoff.
    Wait,
    /// Gates on the entries (threads about to enter old code wait there), polled stacks.
    #[default]
    Trap,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(Strategy::Wait),
            "trap" => Ok(Strategy::Trap),
            _ => Err(format!("unknown strategy `{s}` (wait or trap)")),
        }
    }
}

/// What to do with frames of old code stopped at return sites proven to continue in the new
/// code (see [`crate::extract::frames`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Frames {
    /// Move them to the new code at the switch: a function that never returns is updated.
    #[default]
    Switch,
    /// Wait for them to return, as for any active frame: every call that started in old code
    /// ends in old code.
    Wait,
}

impl std::str::FromStr for Frames {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "switch" => Ok(Frames::Switch),
            "wait" => Ok(Frames::Wait),
            _ => Err(format!("unknown frames policy `{s}` (switch or wait)")),
        }
    }
}

/// Code that must not be active: an old function (or a copy being removed).
#[derive(Debug, Clone, Default)]
pub struct Guarded {
    pub name: String,
    pub start: u64,
    pub end: u64,
    /// Return addresses in this code where a frame is proven to continue in other code
    /// (live old address -> where it resumes): such a frame is switched, not waited for.
    pub switch: BTreeMap<u64, Resume>,
    /// Return addresses where a frame cannot be switched, and why.
    pub stuck: BTreeMap<u64, String>,
    /// Guarded code jumps to this entry (a tail call, or a loop back to the entry): a thread
    /// standing on the entry may be in the middle of guarded code, so it counts as active.
    pub entered_by_jump: bool,
}

/// Where a switched frame continues, and the registers it gets there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub at: u64,
    pub sets: Vec<crate::region::RegValue>,
    pub moves: Vec<crate::bundle::Move>,
    /// The frame's CFA minus its stack pointer at the return address.
    pub cfa_above_sp: i64,
}

impl Guarded {
    pub fn new(name: String, start: u64, end: u64) -> Guarded {
        Guarded { name, start, end, ..Default::default() }
    }

    /// Whether a frame at `pc` keeps this code active. Depth 0 executes `pc` (standing exactly
    /// on the entry is not having entered, unless guarded code jumps there); deeper frames
    /// return to `pc`, which lies after their call, so a call at the very end of the code
    /// returns to `end`.
    pub fn holds(&self, pc: u64, depth: usize) -> bool {
        if depth == 0 {
            pc >= self.start && pc < self.end && (pc != self.start || self.entered_by_jump)
        } else {
            pc > self.start && pc <= self.end && !self.switch.contains_key(&pc)
        }
    }

    /// The first frame of `st` this code is active in (pc, depth), else a word of the scanned
    /// part of the stack that may return into it (depth: where the frames end).
    pub fn touched_by(&self, st: &Stack) -> Option<(u64, usize)> {
        if let Some(d) = st.pcs.iter().enumerate().position(|(d, pc)| self.holds(*pc, d)) {
            return Some((st.pcs[d], d));
        }
        // A scanned word is no frame: it cannot be switched.
        st.scanned.iter().find(|w| **w > self.start && **w <= self.end).map(|w| (*w, st.pcs.len()))
    }
}

/// Mark the guarded code that guarded code jumps to (read from the target as it is now). A
/// tail call from one changed function to another leaves no frame: the thread standing on the
/// second one's entry carries arguments made by the first one's old code, so it must neither
/// be switched there nor wait in that entry's gate for the new code.
pub fn mark_jump_entered(mem: &ProcMem, guarded: &mut [Guarded]) {
    let mut targets = std::collections::HashSet::new();
    for g in guarded.iter() {
        let len = g.end.saturating_sub(g.start);
        if len == 0 || len > 1 << 20 {
            continue;
        }
        if let Ok(code) = mem.read_vec(g.start, len as usize) {
            targets.extend(crate::arch::x86_64::jump_targets(&code, g.start));
        }
    }
    for g in guarded.iter_mut() {
        g.entered_by_jump = targets.contains(&g.start);
    }
}

/// A thread found inside guarded code.
#[derive(Debug, Clone)]
pub struct Activation {
    pub tid: i32,
    pub thread: String,
    pub function: String,
    pub pc: u64,
    /// Depth of the frame (0 = the thread is executing it).
    pub depth: usize,
    /// Why the frame, stopped at a return address, cannot be switched to the new code.
    pub stuck: Option<String>,
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "function `{}` is active on thread {} ({}) at {:#x}", self.function, self.tid, self.thread, self.pc)?;
        if self.depth > 0 {
            write!(f, ", {} frames down", self.depth)?;
        }
        if let Some(why) = &self.stuck {
            write!(f, " (not switchable: {why})")?;
        }
        Ok(())
    }
}

/// What the process looks like for stack checks: unwind tables, memory, maps.
pub struct View<'a> {
    pub proc: &'a Process,
    pub mem: &'a ProcMem,
    pub maps: &'a [Mapping],
    pub modules: &'a Modules,
}

/// Every stopped thread's registers and stack, as the last check unwound them (the switch
/// reuses them instead of unwinding every thread again while the target is stopped).
pub type Stacks = std::collections::HashMap<i32, (crate::ptrace::Regs, Stack)>;

/// Check every stopped thread: the first activation found, or, with none, every thread's
/// registers and stack.
pub fn find_activation(v: &View, stopped: &Stopped, guarded: &[Guarded]) -> Result<std::result::Result<Stacks, Activation>> {
    let mut stacks = Stacks::new();
    for tid in stopped.tids() {
        let regs = stopped.regs(tid)?;
        let stack = unwind::unwind(&regs, v.modules, v.mem, v.maps);
        if let Some(a) = activation_of(v, tid, &stack, guarded) {
            return Ok(Err(a));
        }
        stacks.insert(tid, (regs, stack));
    }
    Ok(Ok(stacks))
}

/// The first guarded code active on one thread's stack.
pub fn activation_of(v: &View, tid: i32, st: &Stack, guarded: &[Guarded]) -> Option<Activation> {
    guarded.iter().find_map(|g| {
        g.touched_by(st).map(|(pc, depth)| Activation {
            tid,
            thread: v.proc.thread_name(tid),
            function: g.name.clone(),
            pc,
            depth,
            stuck: if depth > 0 { g.stuck.get(&pc).cloned() } else { None },
        })
    })
}

/// The moment to switch, found: every thread stopped, no old code active but the frames to
/// switch at proven return sites.
pub struct Watched {
    pub stopped: Stopped,
    pub attempts: u32,
    pub waited: Duration,
    pub switched: Vec<FrameSwitch>,
    /// The entries led to their gates during the wait (trap strategy), if they were.
    pub gated: Option<Gated>,
}

/// What each entry of `h` holds before an apply through its gate, and gets after.
pub fn apply_entry(e: &crate::region::Entry) -> Result<(Vec<u8>, Vec<u8>)> {
    let before = e.previous_bytes()?;
    let after = e.jump().ok_or_else(|| Error::Other(format!("`{}`: new code out of jump range", e.name)))?;
    Ok((before, after))
}

/// Wait until the old functions of `bundle` (and the copies earlier patches carry) are not
/// active in `target`, with `strategy`, for at most `timeout`. With [`Frames::Switch`], frames at
/// return sites proven to continue in the new code (the region's header) do not count; they
/// are returned, to be switched with the jumps.
pub fn watch(target: &Target, exe: &Executable, bundle: &Bundle, mapped: &Mapped, strategy: Strategy, frames: Frames, timeout: Duration) -> Result<Watched> {
    let header = &mapped.header;
    let mut guarded = Vec::new();
    for f in bundle.manifest.functions.iter().filter(|f| f.kind != FunctionKind::Added) {
        let at = exe.avma(f.old_svma.unwrap_or(0))?;
        let end = at + f.old_size.max(f.entry_jump_len() as u64);
        let mut g = Guarded::new(f.name.clone(), at, end);
        if frames == Frames::Switch {
            g.switch = header.return_sites.iter().filter(|r| r.name == f.name).map(|r| (r.old, Resume { at: r.new, sets: r.sets.clone(), moves: r.moves.clone(), cfa_above_sp: r.cfa_above_sp })).collect();
        }
        g.stuck = f.return_sites.iter().filter_map(|r| Some((r.old.checked_add(exe.bias)?, r.why.clone()?))).collect();
        guarded.push(g);
        for a in target.live() {
            for c in a.header.code.iter().filter(|c| c.name == f.name) {
                guarded.push(Guarded::new(format!("{} (patch {})", f.name, a.header.patch_id), c.start, c.start + c.len));
            }
        }
    }
    mark_jump_entered(&target.mem, &mut guarded);
    // Entries reached by a jump from the old code keep leading to it while the old code drains
    // (a thread parked in their gate could not tell where it came from); they are switched with
    // the others, every thread stopped.
    let deferred: Vec<u64> = guarded.iter().filter(|g| g.entered_by_jump).map(|g| g.start).collect();
    // A thread in a gate that read the commit word before the switch, or on the old way out
    // of it, is about to run old code.
    guarded.extend(crate::gate::in_flight(header, true));
    let maps = target.proc.maps()?;
    let modules = Modules::load(target.pid, &maps, &target.mem);
    let view = View { proc: &target.proc, mem: &target.mem, maps: &maps, modules: &modules };
    // The bytes each entry's jump overwrites: no thread may stand inside them when the jumps
    // to the gates are written while old code is still active (at the switch itself no old
    // code is active at all).
    let entry_bytes: Vec<Guarded> = header.entries.iter().map(|e| Guarded::new(format!("the first bytes of `{}`", e.name), e.entry, e.entry + e.width() as u64)).collect();
    let mut gated: Option<Gated> = None;
    let quiet = until_inactive(&view, strategy, &guarded, timeout, &mut |s| {
        if gated.is_none() && !header.gates.is_empty() {
            if find_activation(&view, s, &entry_bytes)?.is_err() {
                return Ok(()); // at the next check
            }
            gated = Some(Gated::install(&target.mem, s, header, Way::Apply, true, &apply_entry, &deferred)?);
            // The tests wait for this line (LIVEPATCH_LOG=debug) before they interrupt a wait.
            tracing::debug!(entries = header.gates.len(), "gates armed");
            crate::fault::point("trap-armed");
        }
        Ok(())
    });
    let give_up = |gated: Option<Gated>, stopped: Option<Stopped>| {
        if !crate::gate::give_up(gated, stopped) {
            mapped.region.leave_mapped();
        }
    };
    let Quiet { stopped, attempts, waited, stacks } = match quiet {
        Ok(q) => q,
        Err(e) => {
            give_up(gated, None);
            return Err(e);
        }
    };
    // The wait strategy lets the process run untraced between two checks: had it called exec
    // meanwhile, the entries would belong to another program and the region would be gone.
    let checked = target.check_region_still_mapped(mapped.region.base, &header.patch_id).and_then(|_| frames_to_switch(&view, &stopped, &guarded, &stacks));
    let switched = match checked {
        Ok(s) => s,
        Err(e) => {
            give_up(gated, Some(stopped));
            return Err(e);
        }
    };
    crate::fault::point("stopped");
    Ok(Watched { stopped, attempts, waited, switched, gated })
}

/// Every thread stopped, none in guarded code: the moment to switch.
pub struct Quiet {
    pub stopped: Stopped,
    pub attempts: u32,
    pub waited: Duration,
    /// Every thread's registers and stack, from the check that found no activation.
    pub stacks: Stacks,
}

/// Wait with `strategy` until no thread is in guarded code. `gate` leads the entries to their
/// gates (trap strategy; called with every thread stopped, possibly more than once).
pub fn until_inactive(v: &View, strategy: Strategy, guarded: &[Guarded], timeout: Duration, gate: &mut dyn FnMut(&Stopped) -> Result<()>) -> Result<Quiet> {
    match strategy {
        Strategy::Wait => wait_inactive(v, guarded, timeout),
        Strategy::Trap => trap::trap_inactive(v, guarded, gate, timeout),
    }
}

/// The `wait` strategy: returns with every thread stopped and none in guarded code.
pub fn wait_inactive(v: &View, guarded: &[Guarded], timeout: Duration) -> Result<Quiet> {
    let start = Instant::now();
    let mut backoff = Duration::from_micros(500);
    let mut attempts = 0;
    loop {
        attempts += 1;
        crate::cancel::check()?;
        v.proc.check_same()?;
        let t0 = Instant::now();
        let stopped = Stopped::all(v.proc, Duration::from_secs(10))?;
        let t1 = Instant::now();
        let found = find_activation(v, &stopped, guarded)?;
        tracing::debug!(threads = stopped.tids().len(), stop_us = (t1 - t0).as_micros() as u64, check_us = t1.elapsed().as_micros() as u64, "stack check");
        match found {
            Ok(stacks) => return Ok(Quiet { stopped, attempts, waited: start.elapsed(), stacks }),
            Err(a) => {
                drop(stopped);
                if start.elapsed() >= timeout {
                    return Err(blocked(&a, timeout, Strategy::Wait));
                }
                std::thread::sleep(backoff.min(timeout.saturating_sub(start.elapsed())));
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// Old code stayed active until the timeout. The advice depends on the strategy: `trap`
/// already waited for the exact moment the code was left, so only a restart helps.
pub fn blocked(a: &Activation, timeout: Duration, strategy: Strategy) -> Error {
    let advice = match strategy {
        Strategy::Wait => "Retry later, use --strategy trap, or restart the process offline to get the fix",
        Strategy::Trap => "The code never left the old function while new calls of it waited at its entry (a loop that does not return?): restart the process offline to get the fix, or patch the functions it calls instead (--function)",
    };
    Error::Blocked(format!("{a} for {:.1} s (the timeout); the target is unchanged. {advice}", timeout.as_secs_f64()))
}

pub mod frames;
pub mod trap;

pub use frames::{frames_to_switch, FrameSwitch, RegWrite};

#[cfg(test)]
mod tests {
    use super::Guarded;

    /// Standing on an entry is not being inside, unless guarded code jumps there (a tail call
    /// from another changed function: that thread is in the middle of the old code).
    #[test]
    fn an_entry_reached_by_a_jump_is_inside() {
        let mut g = Guarded::new("c6".into(), 0x1000, 0x1009);
        assert!(!g.holds(0x1000, 0) && g.holds(0x1004, 0) && !g.holds(0x1009, 0));
        g.entered_by_jump = true;
        assert!(g.holds(0x1000, 0));
        // A return address equal to the entry belongs to the code before it.
        assert!(!g.holds(0x1000, 1));
    }
}
