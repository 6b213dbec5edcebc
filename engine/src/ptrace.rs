//! The ptrace seam: stopping a process's threads and running code in a stopped thread.
//!
//! * [`session`]: attaching, stopping and waiting: the [`Stopped`] session (detached on drop)
//!   and the events it reports.
//! * [`inject`]: an injected system call or function call in a stopped thread, and the
//!   signal frame that restores the thread whatever happens to us.
//!
//! What the trap strategy does with forked children (its `int3` bytes repaired) is its own:
//! `watchpoint::trap::forks`; the session only follows the forks.
pub mod inject;
pub mod session;

pub use inject::{Gadgets, INJECT_SCRATCH};
pub use session::{OnFork, Regs, Stopped};
