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
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
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
