//! Forked children while `int3` bytes are armed: a child inherits the target's code with our
//! `int3` bytes in it, and with nobody tracing it the first one it reaches would kill it. So
//! while the bytes are armed the session follows forks, and each child gets the original bytes
//! back before it runs. Hardware breakpoints need none of this: they are not inherited.
use crate::arch::x86_64::INT3;
use crate::error::Result;
use crate::process::{MemoryReader, ProcMem};
use crate::ptrace::Stopped;

/// From now on, give every child forked by the stopped threads (or by threads they create)
/// the original bytes at these sites (address, original byte).
pub(super) fn repair(s: &mut Stopped, sites: Vec<(u64, u8)>) -> Result<()> {
    s.follow_forks(Some(Box::new(move |child| repair_child(child, &sites))))
}

/// No more: children forked from now on keep what they inherit (the bytes are gone).
pub(super) fn stop(s: &mut Stopped) -> Result<()> {
    s.follow_forks(None)
}

/// Put back each site's original byte where the child still holds our `int3`. Best effort:
/// a child that is gone or unreadable is left as it is.
fn repair_child(child: i32, sites: &[(u64, u8)]) {
    if let Ok(mem) = ProcMem::open(child) {
        for (a, orig) in sites {
            if mem.read_vec(*a, 1).is_ok_and(|b| b[0] == INT3) {
                let _ = mem.write(*a, &[*orig]);
            }
        }
    }
}
