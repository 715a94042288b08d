//! Apps that know their ports, against the real API server: named ports resolved in the status,
//! and per slice a ConfigMap for `envFrom`, a headless Service and an EndpointSlice that follow
//! the slivers with one write per change.
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use portslice_crds::{PortName, PortSlice, PortSliceSpec, Protocol};
use serde_json::json;

use crate::common::*;

fn voice_spec() -> PortSliceSpec {
    PortSliceSpec {
        protocols: vec![Protocol::UDP],
        names: vec![
            PortName {
                name: "sip".into(),
                offset: 0,
                count: None,
                protocol: None,
            },
            PortName {
                name: "rtp".into(),
                offset: 2,
                count: Some(8),
                protocol: None,
            },
        ],
        ..PortSliceSpec::of_size(10)
    }
}

/// A pod of the slice on `node`, running and (not) ready, on the node address `ip`.
async fn sliver(ns: &TestNs, name: &str, node: &str, ip: &str, ready: bool) {
    ns.create_pod(name, "voice", node, "Running").await;
    ns.pods()
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "hostIP": ip, "hostIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }})),
        )
        .await
        .expect("pod status");
}

fn writes(op: &Operator, kind: &str) -> f64 {
    op.metric(&format!(
        "portslice_publish_writes_total{{kind=\"{kind}\"}}"
    ))
    .unwrap_or(0.0)
}

async fn endpoints(ns: &TestNs) -> Vec<(String, String, bool)> {
    let api: Api<EndpointSlice> = Api::namespaced(ns.client.clone(), &ns.name);
    api.get_opt("voice-ipv4")
        .await
        .ok()
        .flatten()
        .map(|es| {
            es.endpoints
                .into_iter()
                .map(|e| {
                    (
                        e.node_name.unwrap_or_default(),
                        e.addresses[0].clone(),
                        e.conditions.and_then(|c| c.ready).unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_allocated_slice_is_published_for_envfrom_and_dns_and_follows_its_slivers() {
    with_namespace("publish", |ns| async move {
        let op = ns.operator(&[]);
        let mut slice = PortSlice::new("voice", voice_spec());
        slice.metadata.namespace = Some(ns.name.clone());
        slice.metadata.annotations = Some(BTreeMap::from([(
            "portslice.io/service-annotations".to_string(),
            "external-dns.alpha.kubernetes.io/hostname: voice.example.org".to_string(),
        )]));
        ns.slices()
            .create(&PostParams::default(), &slice)
            .await
            .expect("create voice");
        let range = ns.wait_allocated("voice").await;

        // Status: the names resolved against the range.
        let status = ns.slices().get("voice").await.unwrap().status.unwrap();
        assert_eq!(
            status.named_ports_text.as_deref(),
            Some(
                format!(
                    "sip={}/UDP rtp={}-{}/UDP",
                    range.start,
                    range.start + 2,
                    range.end
                )
                .as_str()
            )
        );

        // The ConfigMap a container takes with envFrom.
        let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
        let cm = wait_until("the ConfigMap", TIMEOUT, || async {
            cms.get_opt("voice-portslice").await.ok().flatten()
        })
        .await;
        let data = cm.data.unwrap();
        assert_eq!(data["PORTSLICE_RANGE"], range.to_string());
        assert_eq!(data["PORTSLICE_PORT_SIP"], range.start.to_string());
        assert_eq!(data["PORTSLICE_PORT_RTP"], (range.start + 2).to_string());
        assert_eq!(data["PORTSLICE_PORT_RTP_MAX"], range.end.to_string());
        assert_eq!(data["PORTSLICE_SIZE"], "10");

        // The headless Service with the named ports and the annotations passed through.
        let svcs: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
        let svc = wait_until("the Service", TIMEOUT, || async {
            svcs.get_opt("voice").await.ok().flatten()
        })
        .await;
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert!(spec.selector.is_none());
        let ports: Vec<_> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.protocol.unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("sip".into(), "UDP".into(), i32::from(range.start)),
                ("rtp".into(), "UDP".into(), i32::from(range.start) + 2)
            ]
        );
        assert_eq!(
            svc.metadata.annotations.unwrap()["external-dns.alpha.kubernetes.io/hostname"],
            "voice.example.org"
        );

        // Endpoints follow the slivers, one EndpointSlice write per change.
        wait_until("the empty EndpointSlice", TIMEOUT, || async {
            let api: Api<EndpointSlice> = Api::namespaced(ns.client.clone(), &ns.name);
            api.get_opt("voice-ipv4").await.ok().flatten()
        })
        .await;
        // Settled: nothing more is written while nothing changes.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let settled = writes(&op, "EndpointSlice");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            writes(&op, "EndpointSlice"),
            settled,
            "writes without a change"
        );

        sliver(&ns, "voice-a", "node-a", "198.18.0.11", true).await;
        wait_until("node-a's endpoint", TIMEOUT, || async {
            (endpoints(&ns).await == [("node-a".into(), "198.18.0.11".into(), true)]).then_some(())
        })
        .await;
        sliver(&ns, "voice-b", "node-b", "198.18.0.12", false).await;
        wait_until("node-b's endpoint, not ready", TIMEOUT, || async {
            (endpoints(&ns).await.len() == 2).then_some(())
        })
        .await;
        assert_eq!(
            endpoints(&ns).await[1],
            ("node-b".into(), "198.18.0.12".into(), false)
        );
        ns.delete_pod("voice-a").await;
        wait_until("node-a's endpoint to go", TIMEOUT, || async {
            (endpoints(&ns).await == [("node-b".into(), "198.18.0.12".into(), false)]).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let per_change = writes(&op, "EndpointSlice") - settled;
        // Pod create, status, and delete events each reconcile; only real changes write: a's
        // endpoint, b's endpoint (the status update of b may fold in), a's removal.
        assert!(
            (3.0..=4.0).contains(&per_change),
            "{per_change} EndpointSlice writes for 3 sliver changes"
        );

        // A deleted ConfigMap comes back; a renamed port moves in place.
        cms.delete("voice-portslice", &DeleteParams::default())
            .await
            .unwrap();
        wait_until("the ConfigMap to come back", TIMEOUT, || async {
            cms.get_opt("voice-portslice").await.ok().flatten()
        })
        .await;
        ns.slices()
            .patch(
                "voice",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"names": [{"name": "sips", "offset": 1}]}})),
            )
            .await
            .expect("names stay editable");
        wait_until("the ConfigMap to follow the rename", TIMEOUT, || async {
            let d = cms.get_opt("voice-portslice").await.ok()??.data?;
            (d.get("PORTSLICE_PORT_SIPS") == Some(&(range.start + 1).to_string())
                && !d.contains_key("PORTSLICE_PORT_SIP"))
            .then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn someone_elses_object_under_the_slices_name_is_left_alone_with_an_event() {
    with_namespace("foreign", |ns| async move {
        let _op = ns.operator(&[]);
        let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
        let mine: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "taken-portslice"}, "data": {"turnserver.conf": "realm=x"}
        }))
        .unwrap();
        cms.create(&PostParams::default(), &mine).await.unwrap();
        ns.create_size("taken", 4).await;
        ns.wait_allocated("taken").await;
        let e = ns.wait_event("taken", "PublishConflict").await;
        assert!(
            e.note.unwrap_or_default().contains("taken-portslice"),
            "the Event names the object"
        );
        let after = cms.get("taken-portslice").await.unwrap();
        assert_eq!(
            after
                .data
                .unwrap()
                .get("turnserver.conf")
                .map(String::as_str),
            Some("realm=x")
        );
        assert!(after.metadata.owner_references.is_none(), "not adopted");
    })
    .await;
}

#[tokio::test]
async fn port_names_are_checked_at_admission() {
    with_namespace("names", |ns| async move {
        let name =
            |n: &str, offset: u32, count: Option<u32>, protocol: Option<Protocol>| PortName {
                name: n.into(),
                offset,
                count,
                protocol,
            };
        let cases = [
            ("upper", vec![name("SIP", 0, None, None)], "should match"),
            (
                "digits",
                vec![name("5060", 0, None, None)],
                "IANA service names",
            ),
            (
                "twice",
                vec![name("sip", 0, None, None), name("sip", 1, None, None)],
                "port names must be unique",
            ),
            (
                "outside",
                vec![name("rtp", 2, Some(9), None)],
                "must lie inside the slice",
            ),
            (
                "tcp-on-udp",
                vec![name("ctl", 0, None, Some(Protocol::TCP))],
                "one of the slice's protocols",
            ),
        ];
        for (slice, names, says) in cases {
            let spec = PortSliceSpec {
                protocols: vec![Protocol::UDP],
                names,
                ..PortSliceSpec::of_size(10)
            };
            let err = ns.create(slice, spec).await.expect_err(slice);
            assert!(err.to_string().contains(says), "{slice}: {err}");
        }
        ns.create("fits", voice_spec()).await.expect("a valid spec");
    })
    .await;
}
