//! Gates: a switch owned by the target's memory, not by the tool's life.
//!
//! Each entry of a patch gets a gate in the region ([`crate::arch::x86_64::gate`]). While a
//! switch is pending the entries jump to their gates, and one commit word in the region's
//! control page decides for all of them: `NEW` runs the new code, `OLD` the old code (the
//! displaced first instructions, relocated, then on into the old function), `PARK` waits in
//! a bounded futex wait while the tool's heartbeat moves, and takes the fallback way (written
//! next to the word) once it has stopped for
//! [`crate::arch::x86_64::gate::STALE_WAITS`] waits (250 ms at least).
//! The switch itself is one aligned write of the commit word, with every thread stopped and
//! none in the code it leaves: a patch of any number of functions switches at once, and a
//! tool killed at any instant leaves every thread running either all old or all new code,
//! with nothing armed that could trap. After the commit, the entries are rewritten to jump
//! straight to where the word sent them (a kill in between leaves entries that still pass
//! through the gate, the same way).
//!
//! [`Gated`] is the side effect "entries lead to gates": dropped without a commit, it sends
//! every thread the fallback way, puts the entries back, and waits until no thread is left in
//! a gate (so the region can go); [`give_up`] does the same and says whether it can.
use crate::arch::x86_64::gate::{FALLBACK_OFF, HEARTBEAT_OFF, NEW, OLD, PARK, STATE_OFF};
use crate::error::{Error, Result};
use crate::process::{MemoryReader, ProcMem, Process};
use crate::ptrace::Stopped;
use crate::region::Header;
use crate::unwind::{self, Modules};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which way a switch goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Apply: to the new code; a lost tool means the old.
    Apply,
    /// Revert: to the old code; a lost tool means the new.
    Revert,
}

impl Way {
    fn to(self) -> u64 {
        match self {
            Way::Apply => NEW,
            Way::Revert => OLD,
        }
    }
    fn fallback(self) -> u64 {
        match self {
            Way::Apply => OLD,
            Way::Revert => NEW,
        }
    }
}

/// The commit word of a region, and what it means now: `PARK` left by a tool that is gone
/// counts as its fallback.
pub fn effective_state(mem: &dyn MemoryReader, h: &Header) -> Option<u64> {
    if h.gates.is_empty() || h.control == 0 {
        return None;
    }
    let state = mem.read_u64(h.control + STATE_OFF).ok()?;
    if state == PARK {
        return mem.read_u64(h.control + FALLBACK_OFF).ok();
    }
    Some(state)
}

/// Write one control word.
fn set(mem: &ProcMem, control: u64, off: u64, v: u64) -> Result<()> {
    mem.write(control + off, &v.to_le_bytes())
}

/// Settle a commit word left `PARK` by a tool that is gone (the caller holds the target's
/// lock): parked threads take the fallback way now instead of after the heartbeat bound.
pub fn settle(mem: &ProcMem, h: &Header) -> Result<()> {
    if h.gates.is_empty() || h.control == 0 {
        return Ok(());
    }
    if mem.read_u64(h.control + STATE_OFF)? == PARK {
        let fallback = mem.read_u64(h.control + FALLBACK_OFF)?;
        set(mem, h.control, STATE_OFF, fallback)?;
    }
    Ok(())
}

/// The tool is alive: a thread moves the heartbeat word every 10 ms until dropped.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(mem: &ProcMem, control: u64) -> Result<Heartbeat> {
        let mem = mem.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("livepatch-heartbeat".into())
            .spawn(move || {
                let mut beat = mem.read_u64(control + HEARTBEAT_OFF).unwrap_or(0);
                while !flag.load(Ordering::Relaxed) {
                    beat = beat.wrapping_add(1);
                    // A target that exited or exec'd takes no more beats; the main thread notices.
                    let _ = mem.write(control + HEARTBEAT_OFF, &beat.to_le_bytes());
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .map_err(|e| Error::io("cannot start the heartbeat thread", e))?;
        Ok(Heartbeat { stop, thread: Some(thread) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// For an entry: what it holds before a switch (checked) and what it gets after.
pub type EntryBytes<'a> = dyn Fn(&crate::region::Entry) -> Result<(Vec<u8>, Vec<u8>)> + 'a;

/// One entry led to its gate.
struct Led {
    name: String,
    at: u64,
    /// The jump to the gate.
    gate: Vec<u8>,
    /// What the entry held before (restored on abort).
    before: Vec<u8>,
    /// What it holds after the commit.
    after: Vec<u8>,
    /// Led to its gate now; a deferred entry is led at the switch.
    armed: bool,
}

/// Entries of one patch led to their gates, with the commit word `PARK`.
pub struct Gated {
    pid: i32,
    mem: ProcMem,
    control: u64,
    way: Way,
    entries: Vec<Led>,
    /// Live code ranges of the gates.
    ranges: Vec<(u64, u64)>,
    heartbeat: Option<Heartbeat>,
    /// Committed or aborted: nothing left to undo.
    done: bool,
    /// The entries are back to what they held, the commit word to the fallback.
    taken_back: bool,
}

impl Gated {
    /// With every thread stopped (`_stopped`), lead the entries of the patch `h` to its gates
    /// for a switch `way`. `before_after` gives what each entry holds now (checked) and what
    /// it gets after the switch. With `heartbeat`, the threads will run with the gates armed:
    /// the tool's heartbeat starts.
    /// Entries at `deferred` are not led to their gates during the wait: they keep their bytes
    /// until [`Gated::finish`] writes them (with every thread stopped).
    pub fn install(mem: &ProcMem, _stopped: &Stopped, h: &Header, way: Way, heartbeat: bool, before_after: &EntryBytes, deferred: &[u64]) -> Result<Gated> {
        let pid = mem.pid();
        let mem = mem.try_clone()?;
        let mut g = Gated { pid, mem, control: h.control, way, entries: Vec::new(), ranges: h.gates.iter().map(|r| (r.at, r.at + r.len)).collect(), heartbeat: None, done: false, taken_back: false };
        if heartbeat {
            g.heartbeat = Some(Heartbeat::start(&g.mem, h.control)?);
        }
        set(&g.mem, h.control, FALLBACK_OFF, way.fallback())?;
        for e in &h.entries {
            let r = h.gates.iter().find(|r| r.entry == e.entry).ok_or_else(|| Error::Other(format!("no gate for the entry of `{}`", e.name)))?;
            let gate_jump = r.jump().ok_or_else(|| Error::Other(format!("the gate of `{}` is out of jump range", e.name)))?;
            let (before, after) = before_after(e)?;
            let now = g.mem.read_vec(e.entry, before.len())?;
            if now != before && now != gate_jump {
                return Err(crate::jump::changed_under_us(&format!("the entry of `{}`", e.name), e.entry, &now, &before));
            }
            let armed = !deferred.contains(&e.entry);
            if armed {
                g.mem.write(e.entry, &gate_jump)?;
            }
            g.entries.push(Led { name: e.name.clone(), at: e.entry, gate: gate_jump, before: now, after, armed });
        }
        set(&g.mem, h.control, STATE_OFF, PARK)?;
        Ok(g)
    }

    /// The switch, with every thread stopped and none in the code it leaves: one write of the
    /// commit word. Until [`Gated::finish`] the caller may still [`Gated::take_back`] (no
    /// thread has run since); a kill from here on leaves the switch made.
    pub fn switch(&mut self) -> Result<()> {
        // Deferred entries lead to their gates now (no thread is in the old code): a kill
        // after the commit leaves every entry going the same way.
        for e in self.entries.iter_mut().filter(|e| !e.armed) {
            self.mem.write(e.at, &e.gate)?;
            e.armed = true;
        }
        set(&self.mem, self.control, STATE_OFF, self.way.to())?;
        self.heartbeat = None;
        crate::fault::point("committed");
        Ok(())
    }

    /// After [`Gated::switch`]: the entries straight to where the word sent them (a kill in
    /// between leaves entries that still pass through their gates, the same way).
    pub fn finish(mut self) {
        self.done = true;
        for e in &self.entries {
            if let Err(e2) = self.mem.write(e.at, &e.after) {
                // Still switched: the entry passes through its gate.
                tracing::warn!(pid = self.pid, "the entry of `{}` keeps going through its gate: {e2}", e.name);
            }
        }
    }

    /// Take the gates back while the caller holds every thread stopped: every thread the
    /// fallback way, the entries as they were. [`give_up`] then waits for the threads to leave
    /// the gates once they run.
    pub fn take_back(&mut self) -> Result<()> {
        set(&self.mem, self.control, STATE_OFF, self.way.fallback())?;
        self.heartbeat = None;
        for e in &self.entries {
            if self.mem.read_vec(e.at, e.gate.len())? == e.gate {
                self.mem.write(e.at, &e.before)?;
            }
        }
        self.taken_back = true;
        Ok(())
    }

    /// Give up the switch (the threads must not be held by the caller): take the gates back
    /// if not done yet, then wait until no thread is left in one. Whether none is (else the
    /// region must stay mapped).
    fn abort(mut self) -> bool {
        self.done = true;
        self.abort_now()
    }

    fn abort_now(&mut self) -> bool {
        if !self.taken_back {
            // Every thread the fallback way first: parked ones leave, new ones go straight.
            if let Err(e) = set(&self.mem, self.control, STATE_OFF, self.way.fallback()) {
                tracing::error!(pid = self.pid, "could not release the gates: {e}");
                return false;
            }
            self.heartbeat = None;
            let stopped = Process::open(self.pid).and_then(|p| Stopped::all(&p, Duration::from_secs(10)));
            let restored = stopped.and_then(|_s| self.take_back());
            if let Err(e) = restored {
                tracing::warn!(pid = self.pid, "entries left leading to their gates (which send every thread the {} way): {e}", if self.way == Way::Apply { "old" } else { "new" });
                return false;
            }
        }
        let drained = drain(self.pid, &self.ranges, Duration::from_secs(2));
        if !drained {
            tracing::warn!(pid = self.pid, "a thread stays inside a gate: the patch region is left mapped");
        }
        drained
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        if !self.done {
            self.abort_now();
        }
    }
}

/// Give up a switch. With `stopped` (every thread still held), take the gates back at once;
/// then let the threads go and wait until none is left in a gate. Whether the region may be
/// unmapped: no gates, or they were taken back while held and no thread stayed inside.
pub fn give_up(gated: Option<Gated>, stopped: Option<Stopped>) -> bool {
    let Some(mut g) = gated else { return true };
    let taken = stopped.as_ref().is_none_or(|_| g.take_back().is_ok());
    drop(stopped);
    // A failed take-back is retried by abort (which stops the threads itself).
    let drained = g.abort();
    taken && drained
}

/// Wait until no thread of `pid` has a frame in `ranges` (or a word of its stack that may
/// return there), stopping it now and then; whether that happened within `timeout`.
pub fn drain(pid: i32, ranges: &[(u64, u64)], timeout: Duration) -> bool {
    let Ok(proc) = Process::open(pid) else { return true };
    let Ok(mem) = ProcMem::open(pid) else { return true };
    let start = Instant::now();
    let mut modules = None;
    loop {
        let inside = (|| -> Result<bool> {
            let maps = proc.maps()?;
            let modules = modules.get_or_insert_with(|| Modules::load(pid, &maps, &mem));
            let s = Stopped::all(&proc, Duration::from_secs(10))?;
            let hit = |a: u64| ranges.iter().any(|(lo, hi)| a >= *lo && a < *hi);
            for tid in s.tids() {
                let st = unwind::unwind(&s.regs(tid)?, modules, &mem, &maps);
                // A frame in a gate, or a return address into one (depth > 0: a signal
                // handler interrupted a parked thread).
                if st.pcs.iter().any(|pc| hit(*pc)) || st.scanned.iter().any(|w| hit(*w)) {
                    return Ok(true);
                }
            }
            Ok(false)
        })();
        match inside {
            Ok(false) => return true,
            // Gone, or exec'd: nothing of ours runs there any more.
            Err(_) if proc.check_same().is_err() => return true,
            _ if start.elapsed() >= timeout => return false,
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// The gate's read of the commit word as a guarded range: a thread in `[at+1, at+decided)`
/// acts on a value read before the switch. With `old_path`, also the old way (a thread there
/// has started the old function).
pub fn in_flight(h: &Header, old_path: bool) -> Vec<crate::watchpoint::Guarded> {
    let mut out = Vec::new();
    for r in &h.gates {
        out.push(crate::watchpoint::Guarded::new(format!("the gate of `{}`", r.name), r.at, r.at + r.decided));
        if old_path {
            // One byte early: standing at the first moved instruction is already being inside.
            out.push(crate::watchpoint::Guarded::new(format!("{} (moved first instructions)", r.name), r.at + r.old_path - 1, r.at + r.len));
        }
    }
    out
}
