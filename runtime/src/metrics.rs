//! The Prometheus text exposition of a registry (each binary owns its registry and metrics).

use prometheus_client::{encoding::text::encode as encode_into, registry::Registry};

/// `Content-Type` of the exposition served at `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry in the OpenMetrics text format (ends with `# EOF`).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    encode_into(&mut out, registry).expect("writing to a String does not fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn encodes_a_registry() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        registry.register("things", "Things done", c.clone());
        c.inc();
        let text = encode(&registry);
        assert!(text.contains("things_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
