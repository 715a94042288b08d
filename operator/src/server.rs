//! The admin HTTP server: `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! Readiness: the leader is ready once its caches are synced (it has seen every slice and pod
//! and may allocate); a standby is ready as long as it is healthy and campaigning, so that a
//! rolling update of a two-replica Deployment can proceed while only one replica leads.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What `/readyz` reports, updated by the leader election and the controller.
#[derive(Debug, Default)]
pub struct Health {
    leader: AtomicBool,
    synced: AtomicBool,
}

impl Health {
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Release);
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Release);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// `Ok(role)` when ready, `Err(why not)` otherwise.
    pub fn readiness(&self) -> Result<&'static str, &'static str> {
        match (self.is_leader(), self.synced.load(Ordering::Acquire)) {
            (true, true) => Ok("leader, caches synced"),
            (true, false) => Err("leader, caches not synced yet"),
            (false, _) => Ok("standby"),
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AppState { health, metrics })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.readiness() {
        Ok(role) => (StatusCode::OK, format!("ok: {role}\n")),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .leader
        .set(i64::from(state.health.is_leader()));
    match state.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Binds the admin server; the returned future serves until `shutdown` resolves.
pub async fn bind(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to bind the metrics server to {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let serve = axum::serve(listener, router(health, metrics)).with_graceful_shutdown(shutdown);
    Ok((local, serve.into_future()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_is_ready_only_when_synced_and_standby_is_ready() {
        let h = Health::default();
        assert_eq!(h.readiness(), Ok("standby"));
        h.set_leader(true);
        assert!(h.readiness().is_err());
        h.set_synced(true);
        assert!(h.readiness().is_ok());
    }
}
