//! What a user applies: PortSlices and workloads annotated into them. Pure builders.
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use portslice_crds::{PortRange, PortSlice, PortSliceSpec, SLICE_ANNOTATION};
use serde_json::json;

/// Label every e2e object carries, so leftovers are easy to find.
pub const E2E_LABEL: &str = "portslice.io/e2e";

pub fn slice_of_size(name: &str, namespace: &str, size: u32) -> PortSlice {
    slice(name, namespace, PortSliceSpec::of_size(size))
}

pub fn slice_of_ports(name: &str, namespace: &str, ports: PortRange) -> PortSlice {
    slice(name, namespace, PortSliceSpec::exact(ports))
}

fn slice(name: &str, namespace: &str, spec: PortSliceSpec) -> PortSlice {
    let mut s = PortSlice::new(name, spec);
    s.metadata.namespace = Some(namespace.to_string());
    s.metadata.labels = Some([(E2E_LABEL.to_string(), "true".to_string())].into());
    s
}

/// The agent serves TCP and UDP on the first two ports of its slice (read from the netns'
/// ip_local_port_range, which the CNI plugin sets) and on 8080 on its private address. Without a
/// slice it is a plain pod, serving 8080 only. It tolerates every taint: a DaemonSet of it runs
/// on every node, the control plane included.
fn agent_pod_template(app: &str, slice: Option<&str>, image: &str) -> serde_json::Value {
    let (annotations, args) = match slice {
        Some(s) => (
            json!({SLICE_ANNOTATION: s}),
            json!([
                "serve",
                "--slice-ports",
                "2",
                "--tcp",
                "8080",
                "--udp",
                "8080"
            ]),
        ),
        None => (
            json!({}),
            json!(["serve", "--tcp", "8080", "--udp", "8080"]),
        ),
    };
    json!({
        "metadata": {
            "labels": {"app": app, E2E_LABEL: "true"},
            "annotations": annotations
        },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "agent",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "args": args,
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
            }]
        }
    })
}

/// A DaemonSet of the agent, in `slice` or (None) a plain workload.
pub fn agent_daemonset(
    name: &str,
    namespace: &str,
    slice: Option<&str>,
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
/// Deployment recreates instead of surging. `avoid_node`: never on that node (the suite keeps it
/// off the operator leader's node, to show allocation does not depend on where the leader runs).
pub fn agent_deployment(
    name: &str,
    namespace: &str,
    slice: &str,
    image: &str,
    avoid_node: Option<&str>,
) -> Result<Deployment, serde_json::Error> {
    let mut template = agent_pod_template(name, Some(slice), image);
    // Not every taint: a pod tolerating `node.kubernetes.io/unschedulable` is scheduled onto a
    // cordoned node, so a drain would not move it. The control plane is fine.
    template["spec"]["tolerations"] = json!([{
        "key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"
    }]);
    if let Some(node) = avoid_node {
        template["spec"]["affinity"] = json!({"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
                "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [node]}]
            }]}
        }});
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {E2E_LABEL: "true"}},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": name}},
            "template": template
        }
    }))
}

/// A host process on `node` as the datapath sees it: the agent in the node's own network
/// namespace (hostNetwork), serving TCP on `port`.
pub fn host_agent_pod(
    name: &str,
    namespace: &str,
    node: &str,
    port: u16,
    image: &str,
) -> Result<k8s_openapi::api::core::v1::Pod, serde_json::Error> {
    let mut template = agent_pod_template(name, None, image);
    template["spec"]["hostNetwork"] = json!(true);
    template["spec"]["nodeName"] = json!(node);
    template["spec"]["containers"][0]["args"] = json!(["serve", "--tcp", port.to_string()]);
    template["spec"]["containers"][0]["readinessProbe"] =
        json!({"tcpSocket": {"port": port}, "periodSeconds": 1});
    let mut pod = template;
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["namespace"] = json!(namespace);
    serde_json::from_value(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_join_their_slice_by_annotation() {
        let ds = agent_daemonset("game", "ns", Some("game-slice"), "img:1").unwrap();
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
        let d = agent_deployment("web", "ns", "web", "img", Some("n1")).unwrap();
        let affinity =
            serde_json::to_value(&d).unwrap()["spec"]["template"]["spec"]["affinity"].clone();
        assert_eq!(
            affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                [0]["matchExpressions"][0]["values"],
            json!(["n1"])
        );
        assert_eq!(
            d.spec.unwrap().strategy.unwrap().type_.as_deref(),
            Some("Recreate")
        );
    }

    #[test]
    fn plain_workloads_carry_no_slice_annotation() {
        let ds = agent_daemonset("plain", "ns", None, "img").unwrap();
        let ann = ds
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap_or_default();
        assert!(!ann.contains_key(SLICE_ANNOTATION));
        let host = host_agent_pod("h", "ns", "n1", 39001, "img").unwrap();
        let spec = host.spec.unwrap();
        assert_eq!(
            (spec.host_network, spec.node_name.as_deref()),
            (Some(true), Some("n1"))
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
