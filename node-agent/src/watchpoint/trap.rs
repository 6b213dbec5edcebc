//! The `trap` strategy (breakpoints on entries and return addresses).
use super::{Guarded, View};
use crate::error::{Error, Result};
use crate::ptrace::Stopped;
use crate::region::Entry;
use std::time::Duration;

pub struct Trapped {
    pub stopped: Stopped,
    pub attempts: u32,
    pub waited: Duration,
}

pub fn trap_inactive(_v: &View, _guarded: &[Guarded], _entries: &[Entry], _timeout: Duration) -> Result<Trapped> {
    Err(Error::Other("the trap strategy is not available yet; use --strategy wait".into()))
}

pub fn move_held_threads(_stopped: &Stopped, _entries: &[Entry]) -> Result<()> {
    Ok(())
}
