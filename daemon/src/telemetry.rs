//! Span export over OTLP/HTTP, when `[telemetry]` is configured: each source batch (events,
//! LSN) and each sink batch (records, offsets, LSN) becomes a trace, with the log lines inside
//! it as span events. Spans are batched on a thread of their own and
//! flushed when the daemon stops.

use crate::config::TelemetryConfig;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::time::Duration;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::Layer;

/// The traces URL of an OTLP/HTTP endpoint.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Why span export cannot start.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint {endpoint}: {detail}")]
pub struct TelemetryError {
    endpoint: String,
    detail: String,
}

/// The tracing layer that exports BitClone9's spans, and the provider to flush at exit.
pub fn layer<S>(cfg: &TelemetryConfig) -> Result<(impl Layer<S>, SdkTracerProvider), TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let endpoint = traces_url(&cfg.otlp_endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(10))
        .with_headers(
            cfg.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
        )
        .build()
        .map_err(|e| TelemetryError {
            endpoint,
            detail: e.to_string(),
        })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build();
    let tracer = provider.tracer("bitclone9");
    // BitClone9's own spans and events only, at info and above: never the clients' internals.
    // A connector run's span lasts as long as the run (days): left out, so that each batch is
    // a trace of its own, sampled on its own, and sent when it ends.
    let only_ours = Targets::new()
        .with_target("bitclone9", LevelFilter::INFO)
        .with_target("bitclone9::run", LevelFilter::OFF)
        .with_default(LevelFilter::OFF);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(only_ours);
    Ok((layer, provider))
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(traces_url("http://h:4318"), "http://h:4318/v1/traces");
        assert_eq!(traces_url("http://h:4318/"), "http://h:4318/v1/traces");
        assert_eq!(
            traces_url("http://h:4318/v1/traces"),
            "http://h:4318/v1/traces"
        );
    }
}
