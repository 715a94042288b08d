//! The conflist the daemon last found, shared between the reconcile loop that reads it and
//! `/metrics` that exports it. A change is logged once, not on every reconcile.
use std::sync::{Arc, Mutex};

use super::conflist::ChainReport;

#[derive(Clone, Default)]
pub struct ChainState(Arc<Mutex<Option<ChainReport>>>);

impl ChainState {
    pub fn record(&self, report: Option<ChainReport>) {
        let mut current = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *current == report {
            return;
        }
        match &report {
            Some(r) if r.version_supported => tracing::info!(
                file = %r.file,
                cni_version = %r.cni_version,
                plugins = %r.plugins.join(","),
                "in the node's CNI chain"
            ),
            Some(r) => tracing::warn!(
                file = %r.file,
                cni_version = %r.cni_version,
                plugins = %r.plugins.join(","),
                "the node's conflist has a cniVersion portslice does not speak: pods without a slice pass through, slice pods fail"
            ),
            None => tracing::warn!("no CNI conflist on the node yet"),
        }
        *current = report;
    }

    pub fn get(&self) -> Option<ChainReport> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
