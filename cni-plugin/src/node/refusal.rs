//! Telling a PortSlice that this node refuses its pods (a host process listens on one of its
//! ports, or the node counts them among its own). The pod's sandbox failure shows only on the
//! pod; the slice's owner looks at the PortSlice, so ADD posts a Warning Event there, which the
//! operator turns into `status.nodeRefusals`.
//!
//! The Event itself is `portslice_crds::refusal`'s. Best effort: the refusal is the CNI error;
//! a failed report is only logged.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use portslice_crds::conditions;
use portslice_crds::refusal::{RefusedSlice, event, event_name};

use crate::cni::error::{CniError, code};
use crate::slice_source::kube_lookup;

/// The condition reason for a CNI error that is a node refusing a slice, if it is one.
pub fn reason_of(err: &CniError) -> Option<&'static str> {
    match err.code {
        code::FORBIDDEN_PORTS => Some(conditions::REASON_FORBIDDEN),
        code::HOST_PORT_IN_USE => Some(conditions::REASON_HOST_PORT_IN_USE),
        _ => None,
    }
}

/// This node's name: the configured one, else the host name (the kubelet's default).
pub fn node_name(configured: Option<&str>) -> String {
    configured.map(str::to_string).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    })
}

/// Posts (or bumps) the Event; logs and returns on any failure, within `timeout`.
pub fn report(
    kubeconfig: &Path,
    slice: &RefusedSlice,
    node: &str,
    err: &CniError,
    timeout: Duration,
) {
    let Some(reason) = reason_of(err) else {
        return;
    };
    let message = err.msg.clone();
    let work = async {
        let client = kube_lookup::client(kubeconfig).await.map_err(|e| e.msg)?;
        let events: Api<Event> = Api::namespaced(client, &slice.namespace);
        let now = Timestamp::now();
        let fresh = event(slice, node, reason, &message, now);
        match events.create(&PostParams::default(), &fresh).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let name = event_name(&slice.name, node, reason);
                let count = events
                    .get(&name)
                    .await
                    .map_err(|e| e.to_string())?
                    .count
                    .unwrap_or(1);
                let bump = serde_json::json!({
                    "count": count.saturating_add(1),
                    "lastTimestamp": Time(now),
                    "message": message,
                });
                events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&bump))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                tokio::time::timeout(timeout, work)
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
            })
        });
    match outcome {
        Ok(()) => {
            tracing::info!(slice = %format!("{}/{}", slice.namespace, slice.name), node, reason, "reported the refusal on the PortSlice")
        }
        Err(error) => tracing::warn!(%error, "could not report the refusal on the PortSlice"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_are_reported() {
        let refused = CniError::new(code::HOST_PORT_IN_USE, "listens");
        assert_eq!(reason_of(&refused), Some("HostPortInUse"));
        assert_eq!(
            reason_of(&CniError::new(code::FORBIDDEN_PORTS, "22")),
            Some("Forbidden")
        );
        assert_eq!(reason_of(&CniError::new(code::SLIVER_EXISTS, "x")), None);
    }
}
