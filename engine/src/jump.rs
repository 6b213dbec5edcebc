//! Jump: redirect old entries to new code, and switch the frames the watch found. [`Jumps`] is
//! the side effect "these bytes were overwritten": until committed, dropping it puts every
//! original byte back. [`jump`] is the last step of apply.
use crate::error::{Error, Result};
use crate::map::{Mapped, MappedRegion};
use crate::process::{MemoryReader, ProcMem};
use crate::region::Header;
use crate::target::Target;
use crate::watchpoint::frames::FrameWrites;
use crate::watchpoint::{FrameSwitch, Strategy, Watched};

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
                return Err(Error::Other(format!(
                    "{} at {:#x} changed under us (found {}, expected {}); is another tool patching this process?",
                    s.name,
                    s.at,
                    hex::encode(&now),
                    hex::encode(&s.expect)
                )));
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

/// With every thread stopped (`watched`): write the jumps, switch the frames at proven return
/// sites, record them in the region's header, move threads held at an entry to the new code,
/// and let the target go. Until the commit at the end, any failure undoes every write; the
/// region is unmapped when `mapped` is dropped.
pub fn jump(target: &Target, mapped: Mapped, watched: Watched, strategy: Strategy) -> Result<Switched> {
    let Watched { stopped, switched, .. } = watched;
    let sites: Vec<Site> = mapped
        .header
        .entries
        .iter()
        .map(|e| {
            let write = e.jump().ok_or_else(|| Error::Other(format!("`{}`: new code out of jump range", e.name)))?;
            let expect = hex::decode(&e.previous).map_err(|_| Error::Other("corrupt region header".into()))?;
            Ok(Site { name: format!("the entry of `{}`", e.name), at: e.entry, expect, write })
        })
        .collect::<Result<_>>()?;
    let jumps = Jumps::write(&target.mem, &sites)?;
    // Frames at proven return sites: their return addresses now lead into the new code.
    let frames = FrameWrites::write(&target.mem, &stopped, &switched)?;
    if !switched.is_empty() {
        crate::fault::point("frames-switched");
        record_switched(&mapped.region, mapped.header.clone(), &switched, mapped.layout.header_len)?;
    }
    // Last, as nothing undoes it: threads held at an entry go straight to the new code.
    if strategy == Strategy::Trap {
        crate::watchpoint::trap::move_held_threads(&stopped, &mapped.header.entries)?;
    }
    jumps.commit();
    frames.commit();
    let since = stopped.since();
    stopped.detach();
    let pause_us = since.elapsed().as_micros() as u64;
    let Mapped { region, layout, map_us, .. } = mapped;
    region.commit();
    Ok(Switched { pause_us, map_us, region: format!("{:#x}-{:#x}", layout.base, layout.base + layout.len), frames: switched })
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
