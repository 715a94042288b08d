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

/// A local-clock fence around writes that hand out ports. The Lease protects nothing by itself:
/// a leader frozen (GC pause, SIGSTOP, overloaded node) past the Lease expiry still believes it
/// leads until its next renewal attempt fails, while a new leader may already allocate. The
/// fence closes the window: before handing out ports the leader checks, on the monotonic clock,
/// that its last observed renewal is still valid with a margin.
#[derive(Debug, Default)]
pub struct Fence {
    valid_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Fence {
    /// True while this replica's Lease is known to be valid.
    pub fn holds(&self) -> bool {
        let guard = self.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        matches!(*guard, Some(until) if std::time::Instant::now() < until)
    }

    fn set(&self, until: Option<std::time::Instant>) {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// Keeps the fence up to date by reading the Lease; runs until the process ends.
    pub async fn maintain(self: std::sync::Arc<Self>, client: Client, config: Config) {
        use k8s_openapi::api::coordination::v1::Lease;
        let api: kube::Api<Lease> = kube::Api::namespaced(client, &config.lease_namespace);
        let duration = Duration::from_secs(config.lease_duration);
        let margin = Duration::from_millis(config.lease_grace * 500);
        loop {
            let checked = std::time::Instant::now();
            let until = match api.get_opt(&config.lease_name).await {
                Ok(Some(lease)) => lease.spec.and_then(|spec| {
                    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
                    let renewed = spec.renew_time?.0;
                    let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed);
                    let left = remaining(duration, age.unsigned_abs(), age.is_negative(), margin)?;
                    ours.then_some(checked + left)
                }),
                // Unknown: keep what we knew; it runs out on its own.
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the leader Lease");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Ok(None) => None,
            };
            self.set(until);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// How long a Lease renewed `age` ago stays safe to act on: its duration minus the age minus a
/// margin (for in-flight writes and clock granularity). A renewal "in the future" (clock skew
/// between us and the API server) counts as fresh.
pub fn remaining(
    duration: Duration,
    age: Duration,
    renewed_in_future: bool,
    margin: Duration,
) -> Option<Duration> {
    let age = if renewed_in_future {
        Duration::ZERO
    } else {
        age
    };
    duration
        .checked_sub(age)?
        .checked_sub(margin)
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_closes_before_the_lease_expires() {
        let (d, m) = (Duration::from_secs(15), Duration::from_millis(2500));
        assert_eq!(
            remaining(d, Duration::from_secs(0), false, m),
            Some(Duration::from_millis(12500))
        );
        assert_eq!(
            remaining(d, Duration::from_secs(12), false, m),
            Some(Duration::from_millis(500))
        );
        assert_eq!(remaining(d, Duration::from_millis(12500), false, m), None);
        assert_eq!(remaining(d, Duration::from_secs(20), false, m), None);
        assert_eq!(
            remaining(d, Duration::from_secs(3), true, m),
            Some(Duration::from_millis(12500))
        );
    }

    #[test]
    fn a_fresh_fence_holds_and_an_unset_one_does_not() {
        let f = Fence::default();
        assert!(!f.holds());
        f.set(Some(std::time::Instant::now() + Duration::from_secs(5)));
        assert!(f.holds());
        f.set(Some(std::time::Instant::now() - Duration::from_millis(1)));
        assert!(!f.holds());
    }
}
