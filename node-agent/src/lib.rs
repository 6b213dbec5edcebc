//! The livepatch node agent: turns the `LivePatchTask`s of its node into engine calls.
//!
//! * [`discovery`]: container id + pod UID -> host PIDs (cgroup scan, build id and path checks,
//!   PID-reuse guard), on a configurable proc root;
//! * [`fetch`]: the bundle from a ConfigMap, Secret or https URL, sha256-checked;
//! * [`engine`]: the engine calls of one process (re-check, status first, apply or revert);
//! * [`report`]: per-process outcomes -> task phase, reason and message;
//! * [`controller`]: the watch of this node's tasks and pods, status writes, the restart label;
//! * [`preflight`], [`metrics`]: start-up checks, the agent's Prometheus metrics (served with
//!   `/healthz` and `/readyz` by `livepatch-runtime`, shared with the operator).
pub mod controller;
pub mod discovery;
pub mod engine;
pub mod fetch;
pub mod metrics;
pub mod preflight;
pub mod report;
