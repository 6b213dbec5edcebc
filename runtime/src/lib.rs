//! What the node agent and the operator share, written once:
//!
//! * [`telemetry`]: the `tracing` subscriber (text or one JSON object per line, `RUST_LOG`);
//! * [`shutdown`]: one stop signal (SIGTERM or Ctrl-C) for every part of the process;
//! * [`server`]: `/healthz`, `/readyz` and `/metrics` (Prometheus text format), served until
//!   shutdown; [`metrics`]: encoding a registry for it.
//!
//! Each binary keeps its own metrics (their names and labels are its API) and its own notion of
//! ready (the agent: task watch synced; the operator: lease reachable).

pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod telemetry;

pub use server::{Endpoints, Health, Server};
pub use shutdown::Shutdown;
pub use telemetry::LogFormat;
