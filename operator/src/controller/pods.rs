//! Pods of a slice: who holds the slice's range on which node. Pure functions over pod objects.
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSpec, PodStatus};
use kube::ResourceExt;
use kube::api::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use portslice_crds::{PortSlice, SLICE_ANNOTATION, Sliver};

/// The slice a pod asks to join, from its annotation (same namespace).
pub fn slice_of(pod: &Pod) -> Option<ObjectRef<PortSlice>> {
    let name = pod.annotations().get(SLICE_ANNOTATION)?.trim();
    if name.is_empty() {
        return None;
    }
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// A pod that has stopped for good no longer holds ports. A pending pod may still start with
/// the slice's range, so it counts as holding it.
pub fn holds_ports(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Pods of `slice` that hold its range (running, starting, or not yet scheduled).
pub fn members<'a>(slice: &PortSlice, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<&'a Pod> {
    let ns = slice.namespace();
    let name = slice.name_any();
    pods.into_iter()
        .filter(|p| {
            p.namespace() == ns
                && p.annotations().get(SLICE_ANNOTATION).map(|a| a.trim()) == Some(name.as_str())
        })
        .filter(|p| holds_ports(p))
        .collect()
}

/// The slivers to report: one entry per scheduled member pod, sorted by node then pod.
/// The nodes where a member pod runs (its sandbox, hence the CNI ADD, succeeded).
pub fn running_on(members: &[&Pod]) -> std::collections::BTreeSet<String> {
    members
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect()
}

pub fn slivers(members: &[&Pod]) -> Vec<Sliver> {
    let mut out: Vec<Sliver> = members
        .iter()
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            Some(Sliver {
                node,
                pod: p.name_any(),
            })
        })
        .collect();
    out.sort();
    out
}

/// Keeps only what the operator reads, so that watching every pod of a big cluster stays cheap.
pub fn strip(pod: &mut Pod) {
    let annotations = pod.annotations().get(SLICE_ANNOTATION).map(|v| {
        [(SLICE_ANNOTATION.to_string(), v.clone())]
            .into_iter()
            .collect()
    });
    let meta = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        annotations,
        ..ObjectMeta::default()
    };
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    pod.spec = Some(PodSpec {
        node_name,
        containers: Vec::new(),
        ..PodSpec::default()
    });
    // The phase (does it hold ports), and for the slice's EndpointSlice its node address and
    // readiness.
    let status = pod.status.take().unwrap_or_default();
    pod.status = Some(PodStatus {
        phase: status.phase,
        host_ip: status.host_ip,
        host_ips: status.host_ips,
        conditions: status.conditions.map(|c| {
            c.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..PodCondition::default()
                })
                .collect()
        }),
        ..PodStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use portslice_crds::PortSliceSpec;

    fn pod(name: &str, slice: Option<&str>, node: Option<&str>, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                annotations: slice.map(|s| {
                    [(SLICE_ANNOTATION.to_string(), s.to_string())]
                        .into_iter()
                        .collect()
                }),
                labels: Some([("app".to_string(), "x".to_string())].into_iter().collect()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
        }
    }

    fn slice(name: &str) -> PortSlice {
        let mut s = PortSlice::new(name, PortSliceSpec::of_size(1));
        s.metadata.namespace = Some("ns".into());
        s
    }

    #[test]
    fn maps_annotated_pods_to_their_slice() {
        assert_eq!(
            slice_of(&pod("p", Some("media"), None, "Running")),
            Some(ObjectRef::new("media").within("ns"))
        );
        assert_eq!(slice_of(&pod("p", None, None, "Running")), None);
        assert_eq!(slice_of(&pod("p", Some(" "), None, "Running")), None);
    }

    #[test]
    fn reports_scheduled_live_members_as_slivers() {
        let pods = [
            pod("b", Some("media"), Some("node2"), "Running"),
            pod("a", Some("media"), Some("node1"), "Running"),
            pod("pending", Some("media"), None, "Pending"),
            pod("done", Some("media"), Some("node1"), "Succeeded"),
            pod("other", Some("games"), Some("node1"), "Running"),
            pod("plain", None, Some("node1"), "Running"),
        ];
        let m = members(&slice("media"), &pods);
        assert_eq!(m.len(), 3, "running and pending pods hold the range");
        let s = slivers(&m);
        assert_eq!(
            s,
            vec![
                Sliver {
                    node: "node1".into(),
                    pod: "a".into()
                },
                Sliver {
                    node: "node2".into(),
                    pod: "b".into()
                }
            ]
        );
    }

    #[test]
    fn strip_keeps_what_the_operator_reads() {
        let mut p = pod("a", Some("media"), Some("node1"), "Running");
        strip(&mut p);
        assert_eq!(p.labels().len(), 0);
        assert_eq!(slice_of(&p), Some(ObjectRef::new("media").within("ns")));
        assert_eq!(slivers(&members(&slice("media"), [&p])).len(), 1);
    }
}
