//! Which nodes refuse a slice's pods right now, from the Events their CNI plugin posted on the
//! slice (`portslice_crds::refusal`). Pure: the reconcile passes in the watched Events.
//!
//! A refusal is current while its Event was seen within the window (the kubelet keeps retrying
//! the refused sandbox, and each retry bumps the Event) and no pod of the slice runs on that node
//! since (a running pod means the node took the slice after all).
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use portslice_crds::refusal::refused_slice;
use portslice_crds::{NodeRefusal, PortSlice};

/// How long a refusal counts after the node last reported it.
pub const WINDOW: Duration = Duration::from_secs(600);

/// The current refusals of `slice`, one per node (the latest), and when the first of them
/// expires (to look again then).
pub fn current<'a>(
    slice: &PortSlice,
    events: impl IntoIterator<Item = &'a Event>,
    running_on: &BTreeSet<String>,
    now: Timestamp,
) -> (Vec<NodeRefusal>, Option<Duration>) {
    let (ns, name, uid) = (slice.namespace(), slice.name_any(), slice.uid());
    let mut latest: BTreeMap<String, (Timestamp, NodeRefusal)> = BTreeMap::new();
    for e in events {
        if refused_slice(e) != ns.clone().map(|ns| (ns, name.clone())) {
            continue;
        }
        // An Event about an earlier slice of the same name is not about this one.
        if let (Some(a), Some(b)) = (&e.involved_object.uid, &uid)
            && a != b
        {
            continue;
        }
        let Some(node) = e.source.as_ref().and_then(|s| s.host.clone()) else {
            continue;
        };
        let Some(seen) = e
            .last_timestamp
            .as_ref()
            .or(e.first_timestamp.as_ref())
            .map(|t| t.0)
        else {
            continue;
        };
        if running_on.contains(&node) || age(now, seen) > WINDOW {
            continue;
        }
        let refusal = NodeRefusal {
            node: node.clone(),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            last_seen: Timestamp::from_second(seen.as_second())
                .unwrap_or(seen)
                .to_string(),
        };
        match latest.get(&node) {
            Some((t, _)) if *t >= seen => {}
            _ => {
                latest.insert(node, (seen, refusal));
            }
        }
    }
    let expires = latest
        .values()
        .map(|(seen, _)| WINDOW.saturating_sub(age(now, *seen)))
        .min();
    (latest.into_values().map(|(_, r)| r).collect(), expires)
}

fn age(now: Timestamp, then: Timestamp) -> Duration {
    now.duration_since(then).unsigned_abs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EventSource, ObjectReference};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portslice_crds::PortSliceSpec;

    fn slice() -> PortSlice {
        let mut s = PortSlice::new("media", PortSliceSpec::of_size(10));
        s.metadata.namespace = Some("team".into());
        s.metadata.uid = Some("u1".into());
        s
    }

    fn event(node: &str, reason: &str, secs_ago: i64, now: Timestamp) -> Event {
        Event {
            involved_object: ObjectReference {
                kind: Some("PortSlice".into()),
                namespace: Some("team".into()),
                name: Some("media".into()),
                uid: Some("u1".into()),
                ..ObjectReference::default()
            },
            reason: Some(reason.into()),
            message: Some(format!("{node} says no")),
            source: Some(EventSource {
                component: Some(portslice_crds::refusal::NODE_REFUSAL_SOURCE.into()),
                host: Some(node.into()),
            }),
            last_timestamp: Some(Time(
                now - k8s_openapi::jiff::SignedDuration::from_secs(secs_ago),
            )),
            ..Event::default()
        }
    }

    #[test]
    fn fresh_refusals_count_once_per_node_and_expire() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let events = [
            event("w1", "HostPortInUse", 30, now),
            event("w1", "Forbidden", 10, now),
            event("w2", "HostPortInUse", 700, now),
        ];
        let (r, expires) = current(&slice(), &events, &BTreeSet::new(), now);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].node.as_str(), r[0].reason.as_str()),
            ("w1", "Forbidden")
        );
        assert_eq!(expires, Some(WINDOW - Duration::from_secs(10)));
    }

    #[test]
    fn a_running_pod_or_another_slice_clears_it() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let mut other = event("w1", "HostPortInUse", 5, now);
        other.involved_object.uid = Some("an-older-slice".into());
        let mut not_a_node = event("w1", "HostPortInUse", 5, now);
        not_a_node.source = None;
        let (r, _) = current(&slice(), &[other, not_a_node], &BTreeSet::new(), now);
        assert!(r.is_empty(), "{r:?}");
        let running = BTreeSet::from(["w1".to_string()]);
        let (r, expires) = current(
            &slice(),
            &[event("w1", "HostPortInUse", 5, now)],
            &running,
            now,
        );
        assert!(r.is_empty() && expires.is_none());
    }
}
