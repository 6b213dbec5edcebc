//! Extract: compare two executables and turn the changed functions of the new one into a
//! patch [`bundle`](crate::bundle).
//!
//! Functions are compared with their address references masked and replaced by what they
//! refer to (a symbol, a PLT entry, the content of a string literal), so a function is not
//! "changed" only because addresses moved. The bundle keeps NEW's layout: every carried piece
//! (function or read-only data) sits at its NEW address inside a *mirror* of NEW's address
//! range, so references between carried pieces (calls between patched functions, relative
//! jump tables, alignment of SIMD constants) need no fixing. Only references that leave the
//! mirror get a [`Fixup`](crate::bundle::Fixup).
//!
//! The steps, each in its module:
//! 1. `matching`: which symbol of OLD is the counterpart of a symbol of NEW.
//! 2. `refs`: the address references of a function's code, and the jump tables, pointer
//!    words and thread-pointer offsets they lead to.
//! 3. `fingerprint`: functions and read-only data as they read wherever the linker put
//!    things (reference fields masked, replaced by what they designate).
//! 4. [`diff()`] (module `diff`): what differs: functions by fingerprint, data by size and
//!    content, aggregates by their DWARF layout ([`types`]); with a source diff, the functions
//!    holding code of changed lines ([`source`]).
//! 5. [`build()`] (module `builder`): the bundle: every reference bound for the live process,
//!    room for the entry jumps, the register contract of entry thunks ([`regs`]), the return
//!    sites whose frames the new code takes over ([`frames`]).
mod builder;
mod diff;
mod fingerprint;
mod matching;
mod refs;

pub mod frames;
pub mod regs;
pub mod source;
pub mod types;

pub use builder::{build, BuildOptions};
pub use diff::{diff, diff_with_source, Diff, Explained, FunctionChange, Named, SourceExplanation, SourceInput, Why};
