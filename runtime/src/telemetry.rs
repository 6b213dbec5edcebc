//! Structured logs with `tracing`: human-readable text or one JSON object per line.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Log format (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Install the global subscriber. The filter comes from `RUST_LOG` (default `info`). In JSON the
/// current span's fields (namespace, object, generation) are flattened into each line; the list
/// of enclosing spans is left out (it repeats them).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false))
            .init(),
        // Colours only on a terminal: a container's log file would keep the escape codes.
        LogFormat::Text => registry.with(fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))).init(),
    }
}
