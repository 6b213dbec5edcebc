//! Architecture specifics, one module per ISA, compiled for the host ISA it describes: the
//! engine stops and edits processes of the machine it runs on (ptrace register sets, debug
//! registers, signal frames), and the bundles it builds are for that ISA too. Everything else
//! in the engine reaches the ISA only through these modules.
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("livepatch supports x86-64 Linux only: add an `arch` module for this ISA");
