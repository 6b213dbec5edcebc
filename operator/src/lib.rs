//! The LivePatch operator: turns each `LivePatch` into one `LivePatchTask` per target pod for the
//! node agents, and reports their results back in the `LivePatch` status.
//!
//! * [`plan`]: the reconcile logic as plain functions over plain data (unit-tested without a server);
//! * [`controller`]: the kube-rs controller that reads the inputs and carries the plans out;
//! * [`leader`]: leader election on a coordination.k8s.io Lease (only the leader reconciles);
//! * [`metrics`]: the operator's Prometheus metrics (served with `/healthz` and `/readyz` by
//!   `livepatch-runtime`, shared with the node agent);
//! * [`crdgen`]: the CRD YAML generated from the `livepatch-api` types.

pub mod controller;
pub mod crdgen;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod pods;
pub mod webhook;
