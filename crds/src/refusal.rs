//! The Event a node posts on a PortSlice it refuses (a host process listens on one of its ports,
//! or the node counts them among its own): the contract between the CNI plugin, which posts it
//! (`cni-plugin/src/node/refusal.rs`), and the operator, which reads it into
//! `status.nodeRefusals` (`operator/src/controller/refusals.rs`).
//!
//! One Event per (slice, node, reason), under a fixed name: the kubelet retries a refused sandbox
//! with backoff, and each retry bumps `count` and `lastTimestamp` instead of adding an Event.
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource as _;

use crate::PortSlice;

/// `source.component` of a node's refusal Event.
pub const NODE_REFUSAL_SOURCE: &str = "portslice-cni";

/// The PortSlice a refusal is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedSlice {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// The Event's fixed name: the slice's name (cut to leave room) and a hash of node and reason,
/// within the 253 characters of a name.
pub fn event_name(slice: &str, node: &str, reason: &str) -> String {
    let head: String = slice.chars().take(200).collect();
    format!("{head}.refused-{:016x}", fnv1a(&format!("{node}/{reason}")))
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The Event of a first refusal of `slice` by `node`.
pub fn event(
    slice: &RefusedSlice,
    node: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(&slice.name, node, reason)),
            namespace: Some(slice.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(PortSlice::api_version(&()).into_owned()),
            kind: Some(PortSlice::kind(&()).into_owned()),
            name: Some(slice.name.clone()),
            namespace: Some(slice.namespace.clone()),
            uid: slice.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some(NODE_REFUSAL_SOURCE.into()),
            host: Some(node.to_string()),
        }),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        ..Event::default()
    }
}

/// Field selector for watching only nodes' refusal Events.
pub fn field_selector() -> String {
    format!("involvedObject.kind=PortSlice,source={NODE_REFUSAL_SOURCE}")
}

/// The slice (namespace, name) an Event is about, if it is a node's refusal.
pub fn refused_slice(event: &Event) -> Option<(String, String)> {
    let o = &event.involved_object;
    let from_node = event.source.as_ref()?.component.as_deref() == Some(NODE_REFUSAL_SOURCE);
    if !from_node || o.kind.as_deref() != Some("PortSlice") {
        return None;
    }
    Some((o.namespace.clone()?, o.name.clone()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_name_per_slice_node_and_reason() {
        let a = event_name("media", "worker-1", "HostPortInUse");
        assert_eq!(a, event_name("media", "worker-1", "HostPortInUse"));
        assert_ne!(a, event_name("media", "worker-2", "HostPortInUse"));
        assert_ne!(a, event_name("media", "worker-1", "Forbidden"));
        assert!(a.starts_with("media.refused-"));
        assert!(event_name(&"x".repeat(253), "n", "r").len() <= 253);
    }

    #[test]
    fn the_event_reads_back_as_a_refusal_of_its_slice() {
        let slice = RefusedSlice {
            namespace: "team".into(),
            name: "media".into(),
            uid: Some("u".into()),
        };
        let e = event(&slice, "w1", "HostPortInUse", "no", Timestamp::UNIX_EPOCH);
        assert_eq!(refused_slice(&e), Some(("team".into(), "media".into())));
        let mut other = e.clone();
        other.source = None;
        assert_eq!(refused_slice(&other), None);
    }
}
