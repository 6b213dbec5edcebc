//! Test support shared by the test suites of the workspace. A dev-dependency only
//! (`publish = false`): nothing here is part of a shipped binary.
//!
//! * [`matrix`]: the build matrix ([`Variant`]: twelve builds with the live-patching flags,
//!   five as distributions make them) and [`compile`], which builds a C target from
//!   `tests/targets/<scenario>/<version>.c` in one variant, cached on disk by content. Each
//!   version of a target is its own file: the real-build tests hand `diff -u v1.c v2.c` to
//!   `livepatch build --source-diff` as the fix (see `docs/architecture.md`).
//! * [`target`]: [`Target`] runs a compiled target and speaks its line protocol (see
//!   `tests/targets/common/target.h`): `ready <pid>` first, then one answer line per command.
//! * [`cli`]: [`livepatch`] / [`spawn_livepatch`] run the CLI under test and parse its `--json`
//!   output ([`Run`], [`Applied`], [`Status`]).
//! * [`bundle`]: bundle fixtures ([`build_bundle`], [`build_scenario_bundle`], the source diff of
//!   a scenario) and the commands of the CLI contract ([`apply`], [`revert`], [`status`],
//!   [`diff`]).
//! * [`process`]: the target read from outside: `/proc/PID/maps`, `/proc/PID/mem`, thread
//!   lists, tracer state, text snapshots, the debug registers of every thread (ptrace,
//!   briefly), and [`Untouched`], what must not change when an update is refused.
//! * [`elf`]: a small ELF reader (function symbols, load bias, GNU build id), so the tests can
//!   check bytes at known addresses without trusting the tool.
//! * [`skip`]: tests that need something the machine may lack fail, unless
//!   `LIVEPATCH_ALLOW_SKIP=1`.
//! * `mock_api` (feature `mock-api`): the tower-test API server the agent's and the
//!   operator's reconcile tests play.
//!
//! Nothing here sleeps to synchronise with a target: every wait is for a line of output or a
//! process exit, with a deadline that fails the test instead of hanging it.
//!
//! The test crates take it whole: `pub use livepatch_testkit::*;` (the build-matrix macros
//! [`matrix_tests!`], [`real_build_tests!`] and [`variant_tests!`] come with it).

pub mod bundle;
pub mod cli;
pub mod elf;
pub mod matrix;
#[cfg(feature = "mock-api")]
pub mod mock_api;
pub mod process;
pub mod skip;
pub mod target;

pub use bundle::*;
pub use cli::*;
pub use elf::*;
pub use matrix::*;
pub use process::*;
pub use target::*;
