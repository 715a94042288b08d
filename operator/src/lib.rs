//! The PortSlice operator: gives every PortSlice a port range that is unique across the cluster.
//!
//! - [`allocator`]: the pure allocation table (no Kubernetes in it).
//! - [`controller`]: the kube-rs controller that feeds the table from the API server and writes
//!   statuses, conditions and Events.
//! - [`leader`]: one active replica through a `coordination.k8s.io` Lease.
//! - [`policy`]: who may hold which ports (node-critical ports, reservations, quotas); pure.
//! - [`config`], [`metrics`], [`server`], [`telemetry`]: the operational plumbing.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod allocator;
pub mod config;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod publish;
pub mod server;
pub mod telemetry;

use std::sync::Arc;

use kube::Client;
use tokio::sync::{oneshot, watch};
use tracing::{error, info};

use crate::config::Config;
use crate::leader::{Campaign, Fence};
use crate::metrics::Metrics;
use crate::server::Health;

/// Runs one replica: admin server, leader election, and (while leading) the controller.
/// Returns after SIGTERM/SIGINT; exits the process with status 1 if the Lease is lost.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "failed to build a Kubernetes client (KUBECONFIG or in-cluster config): {e}"
        )
    })?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let (addr, server) = server::bind(
        config.metrics_addr,
        health.clone(),
        metrics.clone(),
        stopped(stop_rx.clone()),
    )
    .await?;
    let server = tokio::spawn(server);
    info!(%addr, "admin server listening");

    let mut campaign = Campaign::start(client.clone(), &config).await?;
    info!(identity = %config.identity, lease = %format!("{}/{}", config.lease_namespace, config.lease_name), "campaigning for leadership");
    tokio::select! {
        acquired = campaign.acquired() => acquired?,
        _ = stopped(stop_rx.clone()) => {
            campaign.resign().await;
            return Ok(());
        }
    }
    health.set_leader(true);
    metrics.leader.set(1);
    info!("became leader");
    let fence = Arc::new(Fence::default());
    tokio::spawn(fence.clone().maintain(client.clone(), config.clone()));
    // Allocation waits for the fence anyway; starting with it up avoids a burst of retries.
    for _ in 0..100 {
        if fence.holds() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The controller wants a Sync shutdown future; bridge the watch into a oneshot.
    let (ctl_stop_tx, ctl_stop_rx) = oneshot::channel::<()>();
    let bridge = stopped(stop_rx.clone());
    tokio::spawn(async move {
        bridge.await;
        let _ = ctl_stop_tx.send(());
    });
    let controller = controller::run(client, config, metrics, health.clone(), fence, async move {
        let _ = ctl_stop_rx.await;
    });
    tokio::select! {
        result = controller => result?,
        _ = campaign.lost() => {
            // Another replica may already be allocating: stop writing immediately.
            error!("lost the leader Lease; exiting so that the new leader is the only writer");
            std::process::exit(1);
        }
    }
    health.set_leader(false);
    campaign.resign().await;
    if let Ok(Err(e)) = server.await {
        error!(error = %e, "admin server failed");
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            error!("cannot install signal handlers; SIGTERM will not shut down cleanly");
            std::future::pending::<()>().await;
        }
    }
}
