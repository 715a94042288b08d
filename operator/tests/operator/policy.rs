//! Who may hold which ports, against the real API server: the operator's own refusals (the second
//! line, as when the admission policies are off), the quotas, and the chart's
//! ValidatingAdmissionPolicies (the first line) rendered by `helm template` and applied here.
use std::process::Command;

use kube::api::{Patch, PatchParams};
use portslice_crds::{PortRange, PortSliceSpec, Protocol};
use serde_json::json;

use crate::common::*;

/// With a rule that would open every port to the namespace, the node's own ports are still
/// refused: Forbidden, with a message naming whose port it is, and a Warning Event.
#[tokio::test]
async fn the_nodes_own_ports_are_forbidden_by_the_operator() {
    with_namespace("critical", |ns| async move {
        let _op = ns.operator_with_config(&ns.reservations("1-65535"), &[]);
        for (name, start, end, owner) in [
            ("ssh", 22, 22, "sshd"),
            ("kubelet", 10250, 10250, "kubelet"),
            ("nodeports", 30000, 32767, "NodePort"),
            ("etcd", 2379, 2379, "etcd"),
            ("apiserver", 6443, 6443, "API server"),
        ] {
            ns.create_exact(name, start, end).await;
            let s = ns.wait_reason(name, "Forbidden").await;
            let message = condition(&s, "Ready").unwrap().message;
            assert!(
                message.contains(owner) && message.contains("node's own ports"),
                "{name}: {message}"
            );
            assert!(range_of(&s).is_none(), "{name} got no range");
            let event = ns.wait_event(name, "Forbidden").await;
            assert_eq!(event.type_.as_deref(), Some("Warning"));
        }
        // The policy's own ports stay open, and size slices never land on the node's ports.
        ns.create_exact("sip", 5060, 5061).await;
        assert_eq!(
            ns.wait_allocated("sip").await,
            PortRange {
                start: 5060,
                end: 5061
            }
        );
    })
    .await;
}

/// Without a rule for the namespace no exact ports; a rule opens exactly its ports and
/// protocols, and the refusal says what is allowed.
#[tokio::test]
async fn reservations_outside_the_policy_are_forbidden_saying_what_is_allowed() {
    with_namespace("policy", |ns| async move {
        let config =
            "reservations:\n- {ports: \"5060-5061\", protocols: [UDP], namespaces: [\"{ns}\"]}\n";
        let _op = ns.operator_with_config(config, &[]);
        ns.create("sip", exact_spec(5060, 5061))
            .await
            .expect("create sip (UDP)");
        ns.wait_allocated("sip").await;
        ns.create(
            "both-protocols",
            PortSliceSpec {
                protocols: vec![Protocol::TCP, Protocol::UDP],
                ..exact_spec(5060, 5060)
            },
        )
        .await
        .expect("create");
        let s = ns.wait_reason("both-protocols", "Forbidden").await;
        let message = condition(&s, "Ready").unwrap().message;
        assert!(message.contains("5060-5061 (UDP)"), "{message}");
        ns.create_exact("elsewhere", 7000, 7001).await;
        ns.wait_reason("elsewhere", "Forbidden").await;
        ns.create_size("sized", 10).await;
        ns.wait_allocated("sized").await;
    })
    .await;
}

/// A namespace over its cap waits with QuotaExceeded, never with part of a range, and is
/// allocated once a slice of the namespace goes.
#[tokio::test]
async fn a_namespace_over_its_cap_gets_a_condition() {
    with_namespace("quota", |ns| async move {
        let config = "quotas:\n  default: {ports: 100, slices: 3}\n";
        let _op = ns.operator_with_config(config, &["--pool", "40000-40999", "--quarantine", "0s"]);
        ns.create_size("a", 60).await;
        ns.wait_allocated("a").await;
        ns.create_size("b", 30).await;
        ns.wait_allocated("b").await;
        ns.create_size("c", 20).await;
        let s = ns.wait_reason("c", "QuotaExceeded").await;
        let message = condition(&s, "Ready").unwrap().message;
        assert!(
            message.contains("90 ports") && message.contains("cap of 100"),
            "{message}"
        );
        assert!(range_of(&s).is_none(), "no partial range");
        ns.create_size("d", 5).await;
        ns.wait_allocated("d").await;
        ns.create_size("e", 1).await;
        let s = ns.wait_reason("e", "QuotaExceeded").await;
        assert!(condition(&s, "Ready").unwrap().message.contains("3 slices"));
        // Freeing ports lets the waiting slice in (e goes first: it would take the third place).
        ns.delete("e").await;
        ns.delete("a").await;
        ns.wait_allocated("c").await;
    })
    .await;
}

/// The chart's admission policies, rendered by `helm template` under a release of this test's
/// own name and bound to this namespace only (so parallel tests are not affected).
fn apply_chart_policies(ns: &TestNs, reservations: &[&str]) {
    let cache = std::env::var("PORTSLICE_CACHE").unwrap_or_else(|_| "/var/cache/portslice".into());
    let helm = std::env::var("PORTSLICE_E2E_HELM").unwrap_or_else(|_| format!("{cache}/bin/helm"));
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/portslice");
    let mut args = vec![
        "template".to_string(),
        ns.name.clone(),
        chart.to_string(),
        "--show-only".into(),
        "templates/admission-policies.yaml".into(),
        "--set-string".into(),
        format!(
            "admissionPolicies.namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name={}",
            ns.name
        ),
    ];
    for (i, r) in reservations.iter().enumerate() {
        args.push("--set-string".into());
        args.push(format!("reservations[{i}].ports={r}"));
        args.push("--set-string".into());
        args.push(format!("reservations[{i}].namespaces[0]={}", ns.name));
    }
    let out = Command::new(&helm)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("running {helm}: {e}"));
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kubectl_apply(&out.stdout);
}

#[tokio::test]
async fn the_chart_refuses_forbidden_reservations_at_admission() {
    with_namespace("admission", |ns| async move {
        apply_chart_policies(&ns, &["5060-5061"]);
        // The policy may take a moment to be enforced after it is created.
        let refused = |name: &'static str, start: u16, end: u16| {
            let ns = &ns;
            async move {
                wait_until(&format!("admission to refuse {name}"), TIMEOUT, || async {
                    match ns.create(name, exact_spec(start, end)).await {
                        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 403 => {
                            Some(s.message)
                        }
                        Ok(_) => {
                            let _ = ns.slices().delete(name, &Default::default()).await;
                            None
                        }
                        Err(_) => None,
                    }
                })
                .await
            }
        };
        let m = refused("ssh", 22, 22).await;
        assert!(
            m.contains("node's own ports") && m.contains("22 sshd"),
            "{m}"
        );
        let m = refused("kubelet", 10250, 10250).await;
        assert!(m.contains("10250"), "{m}");
        let m = refused("nodeports", 30000, 32767).await;
        assert!(m.contains("NodePort"), "{m}");
        let m = refused("elsewhere", 7000, 7001).await;
        assert!(
            m.contains("allows 5060-5061 (TCP,UDP)"),
            "says what is allowed: {m}"
        );
        ns.create("sip", exact_spec(5060, 5061))
            .await
            .expect("an allowed reservation");
        ns.create("sized", size_spec(10))
            .await
            .expect("size requests are not policed here");
    })
    .await;
}

#[tokio::test]
async fn the_chart_refuses_a_change_of_a_pods_slice_annotation() {
    with_namespace("podslice", |ns| async move {
        apply_chart_policies(&ns, &[]);
        ns.create_pod("member", "media", "node-a", "Running").await;
        let change = |value: serde_json::Value, dry_run: bool| {
            let ns = &ns;
            async move {
                let params = PatchParams { dry_run, ..Default::default() };
                ns.pods()
                    .patch(
                        "member",
                        &params,
                        &Patch::Merge(json!({"metadata": {"annotations": {portslice_crds::SLICE_ANNOTATION: value}}})),
                    )
                    .await
            }
        };
        // The policy takes a moment to be enforced after it is created. Probe with dry runs:
        // admission runs on them too, and an accepted probe changes nothing, so the pod keeps
        // its slice whenever enforcement begins (a real change accepted just before enforcement
        // could never be put back).
        wait_until("admission to refuse the annotation change", TIMEOUT, || async {
            matches!(change(json!("other"), true).await, Err(kube::Error::Api(_))).then_some(())
        })
        .await;
        for value in [json!("other"), serde_json::Value::Null] {
            match change(value.clone(), false).await {
                Err(kube::Error::Api(s)) => assert!(s.message.contains("cannot change"), "{value}: {}", s.message),
                other => panic!("{value}: the change was not refused: {other:?}"),
            }
        }
        // Other annotations stay editable.
        ns.pods()
            .patch("member", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"team": "a"}}})))
            .await
            .expect("an unrelated annotation");
    })
    .await;
}

/// A node's refusal Event (as the CNI plugin posts it) shows on the slice as
/// `status.nodeRefusals`, per node, until a pod of the slice runs on that node.
#[tokio::test]
async fn a_nodes_refusal_shows_in_the_status_until_a_pod_runs_there() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use portslice_crds::refusal::{RefusedSlice, event};
    with_namespace("refusal", |ns| async move {
        let _op = ns.operator(&[]);
        let created = ns.create_size("media", 10).await;
        ns.wait_allocated("media").await;
        let slice = RefusedSlice {
            namespace: ns.name.clone(),
            name: "media".into(),
            uid: created.metadata.uid.clone(),
        };
        let events: kube::Api<CoreEvent> = kube::Api::namespaced(ns.client.clone(), &ns.name);
        let refusal = event(
            &slice,
            "node-b",
            "HostPortInUse",
            "a host process on this node listens on TCP/40005",
            k8s_openapi::jiff::Timestamp::now(),
        );
        events
            .create(&Default::default(), &refusal)
            .await
            .expect("post the refusal Event");
        let status = wait_until("the refusal in the status", TIMEOUT, || async {
            let s = ns.slices().get("media").await.ok()?.status?;
            (!s.node_refusals.is_empty()).then_some(s)
        })
        .await;
        assert_eq!(status.node_refusal_count, 1);
        let r = &status.node_refusals[0];
        assert_eq!(
            (r.node.as_str(), r.reason.as_str()),
            ("node-b", "HostPortInUse")
        );
        assert!(r.message.contains("TCP/40005"), "{r:?}");
        assert_eq!(
            ready_reason(&ns.slices().get("media").await.unwrap()).as_deref(),
            Some("Allocated"),
            "the slice stays usable on the other nodes"
        );

        // The node took a pod of the slice after all (the listener went away).
        ns.create_pod("media-0", "media", "node-b", "Running").await;
        wait_until("the refusal to clear", TIMEOUT, || async {
            let s = ns.slices().get("media").await.ok()?.status?;
            (s.node_refusals.is_empty() && s.node_refusal_count == 0).then_some(())
        })
        .await;
    })
    .await;
}
