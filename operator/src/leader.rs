//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager). Every replica
//! campaigns; only the holder runs the controller. A leader that loses the Lease must stop
//! writing at once, so the caller exits the process.
use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::Config;

pub struct Campaign {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("failed to set up the leader Lease {namespace}/{name}: {source}")]
    Setup {
        namespace: String,
        name: String,
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("the leader election task stopped")]
    Stopped,
}

impl Campaign {
    /// Starts campaigning for the Lease (creating it if needed).
    pub async fn start(client: Client, config: &Config) -> Result<Self, LeaderError> {
        let manager = LeaseManagerBuilder::new(client, &config.lease_name)
            .with_namespace(&config.lease_namespace)
            .with_identity(&config.identity)
            .with_duration(config.lease_duration)
            .with_grace(config.lease_grace)
            .build()
            .await
            .map_err(|source| LeaderError::Setup {
                namespace: config.lease_namespace.clone(),
                name: config.lease_name.clone(),
                source,
            })?;
        let (state, task) = manager.watch().await;
        Ok(Self { state, task })
    }

    /// Resolves once this replica holds the Lease.
    pub async fn acquired(&mut self) -> Result<(), LeaderError> {
        self.state
            .wait_for(|leader| *leader)
            .await
            .map_err(|_| LeaderError::Stopped)?;
        Ok(())
    }

    /// Resolves when this replica no longer holds the Lease (or the election task died).
    pub async fn lost(&mut self) {
        let _ = self.state.wait_for(|leader| !*leader).await;
    }

    /// Gives the Lease up (so a standby takes over at once) and stops campaigning.
    pub async fn resign(self) {
        let Self { state, task } = self;
        // Closing the channel makes the manager release the Lease and return.
        drop(state);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => info!("released the leader Lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "failed to release the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election task failed"),
            Err(_) => tracing::warn!("timed out releasing the leader Lease"),
        }
    }
}
