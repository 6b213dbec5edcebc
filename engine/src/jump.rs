//! Jump: redirect old entries to new code. [`Jumps`] is the side effect "these entries were
//! overwritten": until committed, dropping it puts every original byte back.
use crate::error::{Error, Result};
use crate::process::{MemoryReader, ProcMem};

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
