//! Structured logs (`tracing`), and the bridge that turns pingora's per-connection
//! handshake-failure log lines into `linkgate_tls_handshakes_total{result="error"}` instead of
//! a log flood.

use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::metrics::Metrics;

const LISTENER_TARGET: &str = "pingora_core::services::listening";

/// Counts pingora's "Downstream handshake error" lines; unknown-SNI refusals are counted by
/// the resolver already and are skipped here.
struct HandshakeErrors {
    metrics: Arc<Metrics>,
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for HandshakeErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut v = MessageVisitor(String::new());
        event.record(&mut v);
        if v.0.contains("handshake") && !v.0.contains("no server certificate") {
            self.metrics.tls_error.inc();
        }
    }
}

/// Installs the global subscriber: human-readable lines on stderr (`LINKGATE_LOG_FORMAT=json`
/// for JSON), level from `RUST_LOG` (default `info`). Pingora's per-connection handshake
/// errors are counted, not printed, unless `RUST_LOG` asks for them.
pub fn init(metrics: Option<Arc<Metrics>>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{LISTENER_TARGET}=off")));
    // pingora's trace level prints request headers (and so magic-link tokens): when trace is
    // asked for, pingora's own crates stay at debug.
    let filter = if filter.max_level_hint() == Some(tracing_subscriber::filter::LevelFilter::TRACE)
    {
        ["pingora_proxy=debug", "pingora_core=debug"]
            .into_iter()
            .filter_map(|d| d.parse().ok())
            .fold(filter, |f, d| f.add_directive(d))
    } else {
        filter
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = std::env::var("LINKGATE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    let counter = metrics.map(|metrics| {
        HandshakeErrors { metrics }
            .with_filter(Targets::new().with_target(LISTENER_TARGET, tracing::Level::ERROR))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(counter)
        .try_init();
}
