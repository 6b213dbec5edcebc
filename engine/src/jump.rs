//! Jump: redirect old entries to new code, and switch the frames the watch found. [`Jumps`] is
//! the side effect "these bytes were overwritten": until committed, dropping it puts every
//! original byte back. [`jump`] is the last step of apply.
use crate::error::{Error, Result};
use crate::map::{Mapped, MappedRegion};
use crate::process::{MemoryReader, ProcMem};
use crate::region::Header;
use crate::target::Target;
use crate::watchpoint::frames::FrameWrites;
use crate::gate::{Gated, Way};
use crate::ptrace::Stopped;
use crate::watchpoint::{FrameSwitch, Watched};

/// One entry to overwrite.
#[derive(Debug, Clone)]
pub struct Site {
    /// What the bytes are, for messages: "the entry of `f`", "the return address of ...".
    pub name: String,
    pub at: u64,
    /// What must be there now (checked just before writing).
    pub expect: Vec<u8>,
    pub write: Vec<u8>,
}

/// Bytes to overwrite hold something else than expected.
pub(crate) fn changed_under_us(what: &str, at: u64, found: &[u8], expected: &[u8]) -> Error {
    Error::Other(format!("{what} at {at:#x} changed under us (found {}, expected {}); is another tool patching this process?", hex::encode(found), hex::encode(expected)))
}

pub struct Jumps<'a> {
    mem: &'a ProcMem,
    written: Vec<(u64, Vec<u8>)>,
    committed: bool,
}

impl<'a> Jumps<'a> {
    /// Write every site, or none: on any mismatch or error the ones written are restored.
    /// The caller holds every thread of the target stopped.
    pub fn write(mem: &'a ProcMem, sites: &[Site]) -> Result<Jumps<'a>> {
        let mut j = Jumps { mem, written: Vec::with_capacity(sites.len()), committed: false };
        for s in sites {
            let now = mem.read_vec(s.at, s.expect.len())?;
            if now != s.expect {
                return Err(changed_under_us(&s.name, s.at, &now, &s.expect));
            }
            mem.write(s.at, &s.write)?;
            j.written.push((s.at, s.expect.clone()));
            if j.written.len() == 1 && sites.len() > 1 {
                crate::fault::point("jump");
            }
        }
        Ok(j)
    }

    pub fn commit(mut self) {
        self.committed = true;
    }

    /// Commit, for an owner that commits as part of a larger write.
    pub(crate) fn commit_in_place(&mut self) {
        self.committed = true;
    }
}

impl Drop for Jumps<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for (at, orig) in self.written.iter().rev() {
            if let Err(e) = self.mem.write(*at, orig) {
                tracing::error!("could not restore the entry at {at:#x}: {e}");
            }
        }
    }
}

/// What the switch did.
pub struct Switched {
    /// How long every thread of the target was stopped (microseconds).
    pub pause_us: u64,
    pub map_us: u64,
    /// The region, as `start-end`.
    pub region: String,
    pub frames: Vec<FrameSwitch>,
}

/// With every thread stopped (`watched`): switch, and let the target go. A patch with gates
/// ([`crate::gate`]) leads its entries to them (if the wait did not already), switches (one
/// write of the commit word), moves the frames at proven return sites and records them in the
/// region's header, then rewrites the entries straight to the new code. A patch without gates
/// writes its jumps one after the other. Until the commit, any failure undoes every write;
/// the region is unmapped when `mapped` is dropped.
pub fn jump(target: &Target, mapped: Mapped, watched: Watched) -> Result<Switched> {
    let Watched { stopped, switched, mut gated, .. } = watched;
    let done = if mapped.header.gates.is_empty() {
        write_jumps(target, &mapped, &stopped, &switched)
    } else {
        through_gates(target, &mapped, &stopped, &switched, &mut gated)
    };
    if let Err(e) = done {
        // Take the gates back while every thread is stopped, let the threads go, and wait
        // for them to leave the gates before the region goes.
        if !crate::gate::give_up(gated, Some(stopped)) {
            mapped.region.leave_mapped();
        }
        return Err(e);
    }
    let since = stopped.since();
    stopped.detach();
    let pause_us = since.elapsed().as_micros() as u64;
    let Mapped { region, layout, map_us, .. } = mapped;
    region.commit();
    Ok(Switched { pause_us, map_us, region: format!("{:#x}-{:#x}", layout.base, layout.base + layout.len), frames: switched })
}

/// The switch through the gates. On failure the frames are put back; the caller takes the
/// gates back (no thread has run since the switch: the word goes back to the fallback).
fn through_gates(target: &Target, mapped: &Mapped, stopped: &Stopped, switched: &[FrameSwitch], gated: &mut Option<Gated>) -> Result<()> {
    if gated.is_none() {
        *gated = Some(Gated::install(&target.mem, stopped, &mapped.header, Way::Apply, false, &crate::watchpoint::apply_entry, &[])?);
    }
    let g = gated.as_mut().expect("installed above");
    // What a kill leaves from here to the switch: entries leading to gates that park threads
    // until they see the tool is gone, then send them the old way.
    crate::fault::point("jump");
    g.switch()?;
    // Frames at proven return sites after the switch (a kill between the two leaves them in
    // old code calling new functions, as any frame that started in old code would).
    let frames = FrameWrites::write(&target.mem, stopped, switched)?;
    record(mapped, switched)?;
    gated.take().expect("installed above").finish();
    frames.commit();
    retarget_calls(&target.mem, &mapped.header);
    Ok(())
}

/// The switch of a patch without gates: the jumps one after the other.
fn write_jumps(target: &Target, mapped: &Mapped, stopped: &Stopped, switched: &[FrameSwitch]) -> Result<()> {
    let sites: Vec<Site> = mapped
        .header
        .entries
        .iter()
        .map(|e| {
            let (expect, write) = crate::watchpoint::apply_entry(e)?;
            Ok(Site { name: format!("the entry of `{}`", e.name), at: e.entry, expect, write })
        })
        .collect::<Result<_>>()?;
    let jumps = Jumps::write(&target.mem, &sites)?;
    let frames = FrameWrites::write(&target.mem, stopped, switched)?;
    record(mapped, switched)?;
    jumps.commit();
    frames.commit();
    retarget_calls(&target.mem, &mapped.header);
    Ok(())
}

/// After the switch, every thread stopped: the direct calls of the old functions lead straight
/// to the new code (a kill half-way leaves some calls going through the entries, to the same
/// code). A field that no longer holds what it held when the region was built is left alone.
fn retarget_calls(mem: &ProcMem, header: &Header) {
    for c in &header.calls {
        let (Ok(previous), Some(written)) = (c.previous_bytes(), c.written()) else { continue };
        match mem.read_vec(c.at, 4) {
            Ok(now) if now == previous => {
                if let Err(e) = mem.write(c.at, &written) {
                    tracing::warn!("a call of `{}` at {:#x} keeps going through the entry: {e}", c.name, c.at);
                }
            }
            _ => tracing::warn!("a call of `{}` at {:#x} changed under us: it keeps going through the entry", c.name, c.at),
        }
    }
}

/// Before a revert, every thread stopped: the calls a patch retargeted lead to the entries
/// again (which still lead to the patch's code until the switch back).
pub fn restore_calls(mem: &ProcMem, header: &Header) -> Result<()> {
    for c in header.calls.iter().filter(|c| c.retargeted(mem)) {
        mem.write(c.at, &c.previous_bytes()?)?;
    }
    Ok(())
}

/// Record the switched frames in the region's header.
fn record(mapped: &Mapped, switched: &[FrameSwitch]) -> Result<()> {
    if switched.is_empty() {
        return Ok(());
    }
    crate::fault::point("frames-switched");
    record_switched(&mapped.region, mapped.header.clone(), switched, mapped.layout.header_len)
}

/// Add the switched frames to the region's header (for `status`), as many as its room holds.
fn record_switched(region: &MappedRegion, mut header: Header, switched: &[FrameSwitch], room: u64) -> Result<()> {
    header.switched = switched.to_vec();
    loop {
        let enc = header.encode();
        if enc.len() as u64 <= room {
            return region.rewrite(0, &enc);
        }
        if header.switched.pop().is_none() {
            return Err(Error::Other("patch region header does not fit its reserved space".into()));
        }
        header.switched_unrecorded += 1;
    }
}
