//! HTTP: `/metrics` (`OpenMetrics`), the JSON API, and the probes. Handlers only read the
//! published snapshot; nothing here touches the kernel.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;

use crate::{api, event_stream::EventHub, metrics, poller::SharedSnapshot};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct AppState {
    latest: Arc<SharedSnapshot>,
    registry: Arc<Registry>,
    hub: Arc<EventHub>,
}

/// The router for the agent's endpoints.
pub fn router(latest: Arc<SharedSnapshot>, hub: Arc<EventHub>) -> Router {
    let registry = Arc::new(metrics::registry(Arc::clone(&latest)));
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/api/v1/proxy", get(serve_proxy))
        .route("/api/v1/dns", get(serve_dns))
        .route("/api/v1/events", get(serve_events))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(serve_ready))
        .with_state(AppState {
            latest,
            registry,
            hub,
        })
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format for
/// everyone else.
async fn serve_metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    match metrics::render(&state.registry) {
        Ok(body) if wants_openmetrics => {
            ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
        }
        Ok(body) => (
            [(header::CONTENT_TYPE, CLASSIC_TEXT)],
            metrics::to_classic_text(&body),
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics: {err}\n"),
        )
            .into_response(),
    }
}

async fn serve_proxy(State(state): State<AppState>) -> Json<api::ProxyStats> {
    Json(api::proxy_stats(&state.latest.load()))
}

async fn serve_dns(State(state): State<AppState>) -> Json<api::DnsStats> {
    Json(api::dns_stats(&state.latest.load()))
}

/// NDJSON, one event per line, until the client goes away or the agent stops.
async fn serve_events(State(state): State<AppState>) -> Response {
    let hub = state.hub;
    let connections = hub.connections.subscribe();
    let dns = hub.dns.subscribe();
    let lines = futures_util::stream::unfold(
        (hub, connections, dns),
        |(hub, mut connections, mut dns)| async move {
            let event = hub.next(&mut connections, &mut dns).await?;
            let mut line = serde_json::to_vec(&event).ok()?;
            line.push(b'\n');
            Some((
                Ok::<_, std::convert::Infallible>(line),
                (hub, connections, dns),
            ))
        },
    );
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

async fn serve_ready(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.latest.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first read of the kernel maps\n",
        )
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    latest: Arc<SharedSnapshot>,
    hub: Arc<EventHub>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(latest, hub))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the listen address, saying what to do when it is taken.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context as _;
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("listening on {addr} (is another collector running? choose another with --listen)")
    })?;
    // tokio takes it over once the runtime runs.
    listener.set_nonblocking(true)?;
    Ok(listener)
}
