//! The test support of the live-process tests is the workspace's test kit (`testkit/`, package
//! `livepatch-testkit`): the build matrix of the C targets, the target line protocol, bundle
//! fixtures, the CLI runners, the /proc and ELF checks. Each test file takes it whole with
//! `mod support; use support::*;`; helpers that only one test file needs stay in that file.

pub use livepatch_testkit::*;
