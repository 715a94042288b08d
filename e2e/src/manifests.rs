//! What a user applies: PortSlices and workloads annotated into them. Pure builders.
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use portslice_crds::{PortRange, PortSlice, PortSliceSpec, Protocol, SLICE_ANNOTATION};
use serde_json::json;

/// Label every e2e object carries, so leftovers are easy to find.
pub const E2E_LABEL: &str = "portslice.io/e2e";

pub fn slice_of_size(name: &str, namespace: &str, size: u32) -> PortSlice {
    slice(
        name,
        namespace,
        PortSliceSpec {
            size: Some(size),
            ports: None,
            protocols: vec![Protocol::TCP, Protocol::UDP],
        },
    )
}

pub fn slice_of_ports(name: &str, namespace: &str, ports: PortRange) -> PortSlice {
    slice(
        name,
        namespace,
        PortSliceSpec {
            size: None,
            ports: Some(ports),
            protocols: vec![Protocol::TCP, Protocol::UDP],
        },
    )
}

fn slice(name: &str, namespace: &str, spec: PortSliceSpec) -> PortSlice {
    let mut s = PortSlice::new(name, spec);
    s.metadata.namespace = Some(namespace.to_string());
    s.metadata.labels = Some([(E2E_LABEL.to_string(), "true".to_string())].into());
    s
}

/// The agent serves TCP and UDP on the first two ports of its slice (read from the netns'
/// ip_local_port_range, which the CNI plugin sets) and on 8080 on its private address.
fn agent_pod_template(app: &str, slice: &str, image: &str) -> serde_json::Value {
    json!({
        "metadata": {
            "labels": {"app": app, E2E_LABEL: "true"},
            "annotations": {SLICE_ANNOTATION: slice}
        },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "agent",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "args": ["serve", "--slice-ports", "2", "--tcp", "8080", "--udp", "8080"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
            }]
        }
    })
}

pub fn agent_daemonset(
    name: &str,
    namespace: &str,
    slice: &str,
    image: &str,
) -> Result<DaemonSet, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": namespace, "labels": {E2E_LABEL: "true"}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": agent_pod_template(name, slice, image)
        }
    }))
}

/// One replica per node at most: a second pod of a slice on the same node is refused, so the
/// Deployment recreates instead of surging.
pub fn agent_deployment(
    name: &str,
    namespace: &str,
    slice: &str,
    image: &str,
) -> Result<Deployment, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {E2E_LABEL: "true"}},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": name}},
            "template": agent_pod_template(name, slice, image)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_join_their_slice_by_annotation() {
        let ds = agent_daemonset("game", "ns", "game-slice", "img:1").unwrap();
        let tpl = ds.spec.unwrap().template;
        let ann = tpl.metadata.unwrap().annotations.unwrap();
        assert_eq!(ann[SLICE_ANNOTATION], "game-slice");
        assert_eq!(
            tpl.spec.unwrap().containers[0].image.as_deref(),
            Some("img:1")
        );
    }

    #[test]
    fn deployment_never_runs_two_pods_of_a_slice_on_one_node_during_rollout() {
        let d = agent_deployment("web", "ns", "web", "img").unwrap();
        assert_eq!(
            d.spec.unwrap().strategy.unwrap().type_.as_deref(),
            Some("Recreate")
        );
    }

    #[test]
    fn slices_ask_for_size_or_exact_ports() {
        let a = slice_of_size("a", "ns", 10);
        assert_eq!((a.spec.size, a.spec.ports), (Some(10), None));
        let b = slice_of_ports(
            "b",
            "ns",
            PortRange {
                start: 5060,
                end: 5061,
            },
        );
        assert_eq!(b.spec.size, None);
        assert_eq!(b.metadata.namespace.as_deref(), Some("ns"));
    }
}
