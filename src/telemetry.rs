//! Installs the tracing subscriber (text or JSON logs) and, when an OTLP endpoint is configured,
//! the OpenTelemetry layer exporting one span per job attempt and per batch.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, reload};

use crate::config::{LogConfig, LogFormat, TelemetryConfig};

/// Keeps the exporter alive and lets SIGHUP change the log level.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    filter: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
}

fn filter(level: &str) -> EnvFilter {
    // RUST_LOG wins over the configured level, as operators expect.
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Logs go to stderr.
pub fn init(log: &LogConfig, otel: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let (filter_layer, handle) = reload::Layer::new(filter(&log.level));
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = if otel.otlp_endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(otel.otlp_endpoint.clone())
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(otel.service_name.clone())
            .build();
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("backfilld")));
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .with(otel_layer)
        .try_init()?;
    Ok(Telemetry {
        provider,
        filter: handle,
    })
}

impl Telemetry {
    /// A function applying a reloaded log level (for the SIGHUP task).
    pub fn filter_handle(&self) -> impl Fn(&str) + Send + 'static {
        let handle = self.filter.clone();
        move |level| {
            if let Err(e) = handle.reload(filter(level)) {
                tracing::warn!(error = %e, "cannot change the log level");
            }
        }
    }

    /// Flushes pending spans.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("backfilld: flushing traces failed: {e}");
        }
    }
}
