//! livepatch: live procedure update for running Linux processes.
//!
//! The pipeline reads like the sequence it performs:
//!
//! ```text
//! extract -> map -> fixup -> watchpoint (activation safety) -> jump      (+ revert, status)
//! ```
//!
//! * [`extract`] compares two ELF executables and writes a [`bundle`].
//! * [`map`] places a region near the old code of a running process (ptrace, no cooperation).
//! * [`fixup`] binds the new code's references to the live process.
//! * [`watchpoint`] decides when it is safe to switch (stack check; with `trap`, the entries
//!   lead to their [`gate`]s while old frames drain).
//! * [`jump`] switches: one write of the gates' commit word, then the jumps and the direct
//!   calls, keeping the original bytes in the region header ([`region`]).
//! * [`revert`] and [`status`] work from what the target itself holds.
//!
//! Architecture specifics live in [`arch`], one module per ISA behind `cfg(target_arch)`.
pub mod arch;
pub mod bundle;
pub mod cancel;
pub mod elf;
pub mod error;
pub mod extract;
pub mod fault;
pub mod fixup;
pub mod gate;
pub mod jump;
pub mod map;
pub mod process;
pub mod ptrace;
pub mod region;
pub mod revert;
pub mod signature;
pub mod status;
pub mod target;
pub mod unwind;
pub mod watchpoint;
pub mod apply;

pub use error::{Error, Result};
