//! Logs and traces for the process: log lines on stderr (text or JSON, filtered by
//! `RUST_LOG`), and, when an OTLP endpoint is configured, the `tracing` spans (an `rpc`
//! span per call, a span per store call) exported to it over gRPC.
//!
//! Two filters, one per destination: the log lines keep their `RUST_LOG` level while the
//! exporter takes its own (`tracing.otlp_filter`, default `keywarden=debug`, which is
//! where the RPC and store spans are). Spans record method names only, never a request
//! field, so nothing secret is exported.
//!
//! The batch exporter runs on the Tokio runtime (the SDK's thread-based batcher cannot
//! drive tonic's I/O), so [`init`] must be called from within the runtime, and
//! [`Telemetry::shutdown`] flushes what is still queued before the process exits.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TracingConfig};

/// The log lines' filter: `RUST_LOG` (INFO when unset), without the notices Postgres
/// sends sqlx at INFO (every start's `relation "_sqlx_migrations" already exists,
/// skipping`) unless `RUST_LOG` names sqlx itself.
fn log_directives(rust_log: Option<&str>) -> String {
    let asked = rust_log.map(str::trim).filter(|s| !s.is_empty());
    match asked {
        Some(spec) if spec.contains("sqlx") => spec.to_owned(),
        Some(spec) => format!("{spec},sqlx::postgres::notice=warn"),
        None => "info,sqlx::postgres::notice=warn".to_owned(),
    }
}

/// Whether text log lines carry ANSI colour: only on a terminal, and not when `NO_COLOR`
/// is set to anything but the empty string (no-color.org). A file or a pipe gets plain
/// text.
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The installed exporter, to flush at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing.otlp_endpoint: {0}")]
    Exporter(String),
    #[error("tracing.otlp_filter: {0}")]
    Filter(String),
}

/// Installs the process's subscriber: log lines, and the OTLP exporter when configured.
pub fn init(format: LogFormat, tracing: &TracingConfig) -> Result<Telemetry, TelemetryError> {
    let directives = log_directives(std::env::var("RUST_LOG").ok().as_deref());
    let log_filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(log_filter);
    let Some(endpoint) = tracing.otlp_endpoint.as_deref() else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let export_filter = EnvFilter::try_new(&tracing.otlp_filter)
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(tracing.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("keywarden");
    let export = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(export_filter);
    tracing_subscriber::registry()
        .with(logs)
        .with(export)
        .init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    /// Exports what is still queued and stops the exporter. The SDK blocks the calling
    /// thread until its export task (on the runtime) is done, so that runs off the
    /// runtime's threads.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("exporting the last traces failed: {e}"),
            Err(e) => eprintln!("exporting the last traces failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_notices_are_quiet_unless_sqlx_is_asked_for() {
        assert_eq!(log_directives(None), "info,sqlx::postgres::notice=warn");
        assert_eq!(
            log_directives(Some(" ")),
            "info,sqlx::postgres::notice=warn"
        );
        assert_eq!(
            log_directives(Some("debug")),
            "debug,sqlx::postgres::notice=warn"
        );
        assert_eq!(log_directives(Some("info,sqlx=debug")), "info,sqlx=debug");
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_under_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
