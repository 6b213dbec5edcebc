//! Revert: the sequence backwards. The newest patch is removed (its entries get back the
//! bytes they had before it), after the same activation check on the code being removed;
//! `all` restores the original code. Works from the region headers alone, so it can undo what
//! another livepatch process applied. With nothing applied it succeeds and reverts nothing.
use crate::error::{Error, Result};
use crate::jump::{Jumps, Site};
use crate::map;
use crate::process::{MemoryReader, ProcMem};
use crate::target::Target;
use crate::status::Applied;
use crate::unwind::Modules;
use crate::gate::{Gated, Way};
use crate::ptrace::Stopped;
use crate::watchpoint::{self, Frames, Guarded, Resume, Strategy, View};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pid: i32,
    pub reverted: Vec<String>,
    pub functions: Vec<String>,
    pub pause_us: u64,
    pub attempts: u32,
    pub remaining: usize,
    pub total_ms: u64,
    /// Frames of the removed code stopped at return sites, moved back to the original functions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub switched_frames: Vec<watchpoint::FrameSwitch>,
}

pub fn revert(pid: i32, all: bool, strategy: Strategy, timeout: Duration, frames: Frames) -> Result<Report> {
    let t0 = Instant::now();
    let (mut report, mut gated) = revert_newest(pid, all, strategy, timeout, frames)?;
    // Patches with gates go one at a time, newest first: each gate's old way leads to the
    // code the patch below left at its entry.
    while all && report.remaining > 0 && gated {
        let (next, next_gated) = revert_newest(pid, all, strategy, timeout, frames)?;
        if next.reverted.is_empty() {
            break;
        }
        report.reverted.extend(next.reverted);
        for f in next.functions {
            if !report.functions.contains(&f) {
                report.functions.push(f);
            }
        }
        report.pause_us += next.pause_us;
        report.attempts += next.attempts;
        report.remaining = next.remaining;
        report.switched_frames.extend(next.switched_frames);
        gated = next_gated;
    }
    report.total_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

/// Revert the newest patch (`all` and no gates: every patch). Whether it went through gates.
fn revert_newest(pid: i32, all: bool, strategy: Strategy, timeout: Duration, frames: Frames) -> Result<(Report, bool)> {
    let t0 = Instant::now();
    let target = Target::open(pid)?;
    target.remove_leftovers();
    let (mem, maps, gadget) = (&target.mem, &target.maps, target.gadgets);
    let live = target.live();
    let Some(newest) = live.last() else {
        // Idempotent: callers revert to make sure; an empty `reverted` says nothing was applied.
        return Ok((Report { pid, reverted: vec![], functions: vec![], pause_us: 0, attempts: 0, remaining: 0, total_ms: t0.elapsed().as_millis() as u64, switched_frames: vec![] }, false));
    };
    let gated = !newest.header.gates.is_empty();
    let removing: Vec<&Applied> = if all && !gated { live.clone() } else { vec![*newest] };
    let (sites, functions) = entry_sites(mem, &live, &removing, all && !gated)?;
    let mut guarded = guarded_code(&live, &removing, frames);
    if gated {
        guarded.extend(crate::gate::in_flight(&newest.header, false));
    }
    let modules = Modules::load(pid, maps, mem);
    let view = View { proc: &target.proc, mem, maps, modules: &modules };
    // Through the gates: an entry holds the patch's jump (or its gate's, left by a tool that
    // died after a commit) and gets back what it had before the patch.
    let revert_entry = |e: &crate::region::Entry| -> Result<(Vec<u8>, Vec<u8>)> {
        let before = e.jump().ok_or_else(|| Error::Other("corrupt region header".into()))?;
        Ok((before, e.previous_bytes()?))
    };
    // Calls straight to the patch's code would pass the gates: through the entries again.
    let install = |s: &Stopped, heartbeat: bool| -> Result<Gated> {
        crate::jump::restore_calls(mem, &newest.header)?;
        Gated::install(mem, s, &newest.header, Way::Revert, heartbeat, &revert_entry, &[])
    };
    let mut gate: Option<Gated> = None;
    let quiet = watchpoint::until_inactive(&view, strategy, &guarded, timeout, &mut |s| {
        if gated && gate.is_none() {
            gate = Some(install(s, true)?);
            tracing::debug!(entries = newest.header.gates.len(), "gates armed");
            crate::fault::point("trap-armed");
        }
        Ok(())
    });
    // Reverting never unmaps on failure: whether the region could go does not matter here.
    let watchpoint::Quiet { stopped, attempts, stacks, .. } = match quiet {
        Ok(q) => q,
        Err(e) => {
            crate::gate::give_up(gate, None);
            return Err(e);
        }
    };
    let switched = match watchpoint::frames_to_switch(&view, &stopped, &guarded, &stacks) {
        Ok(s) => s,
        Err(e) => {
            crate::gate::give_up(gate, Some(stopped));
            return Err(e);
        }
    };
    crate::fault::point("revert-stopped");
    let done = (|| -> Result<()> {
        if gated {
            if gate.is_none() {
                gate = Some(install(&stopped, false)?);
            }
            crate::fault::point("jump");
            gate.as_mut().expect("installed above").switch()?;
            let frames = watchpoint::frames::FrameWrites::write(mem, &stopped, &switched)?;
            if !switched.is_empty() {
                crate::fault::point("revert-frames-switched");
            }
            gate.take().expect("installed above").finish();
            frames.commit();
        } else {
            for a in removing.iter().rev() {
                crate::jump::restore_calls(mem, &a.header)?;
            }
            let jumps = Jumps::write(mem, &sites)?;
            // `new` is where the frame goes: here, back to the original function.
            let frames = watchpoint::frames::FrameWrites::write(mem, &stopped, &switched)?;
            if !switched.is_empty() {
                crate::fault::point("revert-frames-switched");
            }
            jumps.commit();
            frames.commit();
        }
        Ok(())
    })();
    if let Err(e) = done {
        crate::gate::give_up(gate, Some(stopped));
        return Err(e);
    }
    let since = stopped.since();
    stopped.detach();
    let pause_us = since.elapsed().as_micros() as u64;
    let mut reverted = Vec::new();
    for a in &removing {
        let range = [(a.mapping.start, a.mapping.end)];
        // Threads released from the gates the old way, or finishing in the region, leave it
        // first; one that does not is left a mapped region, removed by the next command.
        if !crate::gate::drain(pid, &range, Duration::from_secs(2)) {
            tracing::warn!("patch {} reverted but a thread is still inside its region: left mapped", a.header.patch_id);
        } else if let Err(e) = map::unmap(pid, gadget, a.mapping.start, a.mapping.end - a.mapping.start) {
            tracing::warn!("patch {} reverted but its region stays mapped: {e}", a.header.patch_id);
        }
        reverted.push(a.header.patch_id.clone());
    }
    let report = Report { pid, reverted, functions, pause_us, attempts, remaining: live.len() - removing.len(), total_ms: t0.elapsed().as_millis() as u64, switched_frames: switched };
    Ok((report, gated))
}

/// The jumps to undo: each entry of the removed patches back to what it held before them
/// (`all`: its original bytes), newest first; and the functions concerned.
fn entry_sites(mem: &ProcMem, live: &[&Applied], removing: &[&Applied], all: bool) -> Result<(Vec<Site>, Vec<String>)> {
    let mut sites: Vec<Site> = Vec::new();
    let mut functions = Vec::new();
    for a in removing.iter().rev() {
        for e in &a.header.entries {
            if sites.iter().any(|s| s.at == e.entry) {
                continue; // a newer patch's entry already restores further back
            }
            let now = mem.read_vec(e.entry, e.width())?;
            let corrupt = |_| Error::Other("corrupt region header".into());
            // `all`: back to the original; else to what was there before this patch.
            let write = hex::decode(if all { &e.original } else { &e.previous }).map_err(corrupt)?;
            let through_gate = a.header.gates.iter().any(|g| g.entry == e.entry && g.jump().as_ref() == Some(&now));
            if e.jump() != Some(now.clone()) && !through_gate {
                // A livepatch process that died between two jumps (applying or reverting)
                // leaves some entries on the bytes they had before this patch: nothing to
                // undo there, the others are reverted.
                if now == hex::decode(&e.previous).map_err(corrupt)? || now == write {
                    continue;
                }
                return Err(Error::Other(format!(
                    "the entry of `{}` does not hold patch {}'s jump (someone changed it); not reverting",
                    e.name, a.header.patch_id
                )));
            }
            sites.push(Site { name: format!("the entry of `{}`", e.name), at: e.entry, expect: now, write });
            functions.push(e.name.clone());
        }
    }
    if all {
        // Entries first patched by older patches must go back to their original bytes too.
        for s in sites.iter_mut() {
            if let Some(orig) = live.iter().find_map(|a| a.header.entries.iter().find(|e| e.entry == s.at)) {
                s.write = hex::decode(&orig.original).unwrap_or_else(|_| s.write.clone());
            }
        }
    }
    Ok((sites, functions))
}

/// The code being removed, with the return sites where a frame of it can go back to the
/// original function.
fn guarded_code(live: &[&Applied], removing: &[&Applied], frames: Frames) -> Vec<Guarded> {
    // A frame of new code stopped at a return site proven both ways goes back to the original
    // function, when that is what its entry gets back (no older patch of it stays).
    let older = |name: &str| live.iter().any(|o| !removing.iter().any(|r| r.header.seq == o.header.seq) && o.header.entries.iter().any(|e| e.name == name));
    removing
        .iter()
        .flat_map(|a| {
            a.header.code.iter().map(move |c| {
                let mut g = Guarded::new(format!("{} (patch {})", c.name, a.header.patch_id), c.start, c.start + c.len);
                if frames == Frames::Switch && !older(&c.name) {
                    g.switch = a.header.return_sites.iter().filter(|r| r.back && r.name == c.name).map(|r| (r.new, Resume { at: r.old, sets: r.back_sets.clone(), moves: r.back_moves.clone(), cfa_above_sp: r.cfa_above_sp })).collect();
                }
                g
            })
        })
        .collect()
}
