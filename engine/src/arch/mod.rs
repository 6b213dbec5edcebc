//! Architecture specifics, one module per ISA. Every module is always compiled, so decoding and
//! encoding are testable on any host; only the register access in [`crate::ptrace`] is tied to
//! the host ISA.
pub mod x86_64;
