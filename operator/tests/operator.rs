//! The operator against a real kube-apiserver + etcd. Needs KUBECONFIG; run through
//! `e2e/scripts/test-operator.sh` (not part of `cargo test --lib`).
mod common;
#[path = "operator/policy.rs"]
mod policy;
#[path = "operator/publish.rs"]
mod publish;

use std::time::{Duration, Instant};

use common::*;
use futures::{StreamExt, stream};
use kube::api::{Patch, PatchParams};
use portslice_crds::{PortRange, PortSliceSpec, Sliver};
use serde_json::json;

#[tokio::test]
async fn allocates_a_range_with_conditions_events_and_metrics() {
    with_namespace("allocates", |ns| async move {
        let op = ns.operator(&["--pool", "40000-40999", "--allocation-events", "true"]);
        ns.create_size("media", 100).await;
        let range = ns.wait_allocated("media").await;
        assert_eq!(
            range,
            PortRange {
                start: 40000,
                end: 40099
            }
        );
        let slice = ns.slices().get("media").await.unwrap();
        let status = slice.status.clone().unwrap();
        assert_eq!(status.range_text.as_deref(), Some("40000-40099"));
        assert_eq!(status.size, Some(100));
        let allocated = condition(&slice, "Allocated").unwrap();
        assert_eq!(
            (allocated.status.as_str(), allocated.reason.as_str()),
            ("True", "Allocated")
        );
        assert_eq!(condition(&slice, "Ready").unwrap().status, "True");
        let event = ns.wait_event("media", "Allocated").await;
        assert!(event.note.unwrap_or_default().contains("40000-40099"));
        assert!(
            slice
                .finalizers()
                .contains(&portslice_crds::FINALIZER.to_string())
        );

        op.wait_ready().await;
        assert_eq!(op.get("/healthz").map(|r| r.0), Some(200));
        wait_until("pool metrics", TIMEOUT, || async {
            (op.metric("portslice_pool_used_ports") == Some(100.0)).then_some(())
        })
        .await;
        assert_eq!(op.metric("portslice_pool_size_ports"), Some(1000.0));
        assert_eq!(op.metric("portslice_pool_free_ports"), Some(900.0));
        assert_eq!(op.metric("portslice_allocations_total"), Some(1.0));
        let (_, body) = op.get("/metrics").unwrap();
        assert!(
            body.contains("portslice_reconcile_duration_seconds_count"),
            "{body}"
        );
    })
    .await;
}

use kube::ResourceExt;

#[tokio::test]
async fn a_deleted_range_is_reused_only_after_the_quarantine() {
    with_namespace("quarantine", |ns| async move {
        let _op = ns.operator(&["--pool", "40000-40009", "--quarantine", "4s"]);
        ns.create_size("old", 10).await;
        let old_range = ns.wait_allocated("old").await;
        ns.create_size("new", 10).await;
        ns.wait_reason("new", "PoolExhausted").await;

        let deleted = Instant::now();
        ns.delete("old").await;
        // The old slice stays, drained but quarantined, still holding its ports.
        let draining = ns.wait_reason("old", "Terminating").await;
        assert_eq!(range_of(&draining), Some(old_range));
        let drained_at = wait_until("drainedAt", TIMEOUT, || async {
            ns.slices().get("old").await.ok()?.status?.drained_at
        })
        .await;
        assert!(!drained_at.is_empty());
        assert_eq!(ns.wait_allocated("new").await, old_range);
        let took = deleted.elapsed();
        assert!(
            took >= Duration::from_secs(3),
            "range reused {took:?} after deletion, before the quarantine"
        );
        ns.wait_gone("old", TIMEOUT).await;
    })
    .await;
}

#[tokio::test]
async fn pool_exhaustion_is_reported_and_recovers_when_space_frees() {
    with_namespace("exhaustion", |ns| async move {
        // A long retry interval proves the waiting slice is woken by the deletion itself.
        let _op = ns.operator(&[
            "--pool",
            "40000-40019",
            "--quarantine",
            "0s",
            "--retry-interval",
            "10m",
        ]);
        ns.create_size("a", 10).await;
        ns.wait_allocated("a").await;
        ns.create_size("b", 10).await;
        ns.wait_allocated("b").await;
        ns.create_size("c", 5).await;
        let waiting = ns.wait_reason("c", "PoolExhausted").await;
        let allocated = condition(&waiting, "Allocated").unwrap();
        assert_eq!(allocated.status, "False");
        assert!(
            allocated.message.contains("no free run of 5 ports"),
            "{}",
            allocated.message
        );
        let event = ns.wait_event("c", "PoolExhausted").await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));

        ns.delete("a").await;
        let start = Instant::now();
        assert_eq!(
            ns.wait_allocated("c").await,
            PortRange {
                start: 40000,
                end: 40004
            }
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "waiting slice was not woken by the deletion"
        );
        ns.assert_no_overlap().await;
    })
    .await;
}

#[tokio::test]
async fn exact_ports_conflict_the_older_slice_wins() {
    with_namespace("conflict", |ns| async move {
        // Both exist before any operator runs, so the operator may see them in any order.
        ns.create_exact("a-older", 5060, 5061).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        ns.create_exact("b-newer", 5061, 5062).await;
        let _op = ns.operator_with_config(&ns.reservations("5060-5069"), &["--quarantine", "0s"]);
        assert_eq!(
            ns.wait_allocated("a-older").await,
            PortRange {
                start: 5060,
                end: 5061
            }
        );
        let loser = ns.wait_reason("b-newer", "Conflict").await;
        let message = condition(&loser, "Allocated").unwrap().message;
        assert!(message.contains("a-older"), "{message}");
        let event = ns.wait_event("b-newer", "Conflict").await;
        assert_eq!(event.type_.as_deref(), Some("Warning"));

        ns.delete("a-older").await;
        assert_eq!(
            ns.wait_allocated("b-newer").await,
            PortRange {
                start: 5061,
                end: 5062
            }
        );
        ns.assert_no_overlap().await;
    })
    .await;
}

#[tokio::test]
async fn hundreds_of_concurrent_creates_never_overlap() {
    with_namespace("concurrent", |ns| async move {
        let _op = ns.operator(&["--pool", "40000-59999"]);
        let n = 300u32;
        stream::iter(0..n)
            .for_each_concurrent(50, |i| {
                let ns = &ns;
                async move {
                    ns.create_size(&format!("s{i}"), 1 + (i * 7) % 40).await;
                }
            })
            .await;
        wait_until("all slices allocated", TIMEOUT, || async {
            let ranges = ns.assert_no_overlap().await;
            (ranges.len() == n as usize).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn operator_killed_and_restarted_mid_stream_never_overlaps() {
    with_namespace("restart", |ns| async move {
        let n = 300u32;
        let mut op = ns.operator(&["--pool", "40000-59999"]);
        let creator = {
            let ns = TestNs {
                client: ns.client.clone(),
                name: ns.name.clone(),
            };
            tokio::spawn(async move {
                stream::iter(0..n)
                    .for_each_concurrent(20, |i| {
                        let ns = &ns;
                        async move {
                            ns.create_size(&format!("s{i}"), 1 + (i * 13) % 50).await;
                        }
                    })
                    .await;
            })
        };
        // Kill it hard twice while slices are being created and allocated.
        for _ in 0..2 {
            wait_until("some allocations", TIMEOUT, || async {
                let list = ns.slices().list(&Default::default()).await.ok()?;
                let done = list.items.iter().filter(|s| range_of(s).is_some()).count();
                (done > 20).then_some(())
            })
            .await;
            op.kill();
            ns.assert_no_overlap().await;
            op = ns.operator(&["--pool", "40000-59999"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        creator.await.expect("creator task");
        wait_until("all slices allocated after restarts", TIMEOUT, || async {
            let ranges = ns.assert_no_overlap().await;
            (ranges.len() == n as usize).then_some(())
        })
        .await;
        assert_eq!(op.metric("portslice_overlaps_detected_total"), Some(0.0));
    })
    .await;
}

#[tokio::test]
async fn a_restarted_operator_rebuilds_its_table_from_the_statuses() {
    with_namespace("rebuild", |ns| async move {
        let mut op = ns.operator(&["--pool", "40000-40999"]);
        for i in 0..20 {
            ns.create_size(&format!("z{i:02}"), 10).await;
        }
        for i in 0..20 {
            ns.wait_allocated(&format!("z{i:02}")).await;
        }
        assert!(op.terminate().success());
        // New slices that list before the old ones (etcd lists by name) while no operator runs:
        // the new operator must know every old status before it hands anything out.
        for i in 0..20 {
            ns.create_size(&format!("a{i:02}"), 10).await;
        }
        let _op = ns.operator(&["--pool", "40000-40999"]);
        for i in 0..20 {
            ns.wait_allocated(&format!("a{i:02}")).await;
        }
        let ranges = ns.assert_no_overlap().await;
        assert_eq!(ranges.len(), 40);
        // First fit continues right after the old allocations (in any order among the new).
        let new: Vec<_> = ranges
            .iter()
            .filter(|(n, _)| n.starts_with('a'))
            .map(|(_, r)| *r)
            .collect();
        assert_eq!(new.iter().map(|r| r.start).min(), Some(40200));
        assert_eq!(new.iter().map(|r| r.end).max(), Some(40399));
    })
    .await;
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies() {
    with_namespace("standby", |ns| async move {
        let mut first = ns.operator(&[]);
        first.wait_leader().await;
        let mut second = ns.operator(&[]);
        second.wait_ready().await;
        assert_eq!(
            second.metric("portslice_leader"),
            Some(0.0),
            "second replica must stand by"
        );
        ns.create_size("one", 10).await;
        ns.wait_allocated("one").await;

        // SIGTERM: clean exit, Lease released, the standby takes over at once.
        let status = first.terminate();
        assert!(
            status.success(),
            "operator exited with {status} after SIGTERM"
        );
        second.wait_leader().await;
        ns.create_size("two", 10).await;
        ns.wait_allocated("two").await;

        // SIGKILL: no release; a third replica takes over once the Lease expires.
        let third = ns.operator(&[]);
        third.wait_ready().await;
        second.kill();
        let killed = Instant::now();
        third.wait_leader().await;
        assert!(killed.elapsed() < Duration::from_secs(20));
        ns.create_size("three", 10).await;
        ns.wait_allocated("three").await;
        ns.assert_no_overlap().await;
    })
    .await;
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_exits() {
    with_namespace("leaselost", |ns| async move {
        let mut first = ns.operator(&[]);
        first.wait_leader().await;
        let second = ns.operator(&[]);
        second.wait_ready().await;
        // Freeze the leader past the Lease duration: the standby takes over...
        first.signal("STOP");
        second.wait_leader().await;
        ns.create_size("while-frozen", 10).await;
        ns.wait_allocated("while-frozen").await;
        // ...and the old leader, once it runs again, notices and exits non-zero instead of
        // writing next to the new one.
        first.signal("CONT");
        let status = first.wait_exit(Duration::from_secs(30)).await;
        assert!(
            !status.success(),
            "a leader that lost its Lease must exit non-zero, got {status}"
        );
        ns.create_size("after", 10).await;
        ns.wait_allocated("after").await;
        ns.assert_no_overlap().await;
    })
    .await;
}

#[tokio::test]
async fn slivers_are_reported_from_annotated_pods() {
    with_namespace("slivers", |ns| async move {
        let _op = ns.operator(&[]);
        ns.create_size("media", 10).await;
        ns.wait_allocated("media").await;
        ns.create_pod("media-a", "media", "node-a", "Running").await;
        ns.create_pod("media-b", "media", "node-b", "Running").await;
        ns.create_pod("unrelated", "other", "node-a", "Running")
            .await;
        let want = vec![
            Sliver {
                node: "node-a".into(),
                pod: "media-a".into(),
            },
            Sliver {
                node: "node-b".into(),
                pod: "media-b".into(),
            },
        ];
        wait_until("two slivers", TIMEOUT, || async {
            let st = ns.slices().get("media").await.ok()?.status?;
            (st.slivers == want && st.sliver_count == 2).then_some(())
        })
        .await;
        ns.set_phase("media-b", "Succeeded").await;
        wait_until("one sliver", TIMEOUT, || async {
            let st = ns.slices().get("media").await.ok()?.status?;
            (st.sliver_count == 1 && st.slivers[0].pod == "media-a").then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn deletion_is_held_while_a_pod_of_the_slice_exists() {
    with_namespace("finalizer", |ns| async move {
        let _op = ns.operator(&["--quarantine", "1s"]);
        ns.create_size("media", 10).await;
        let range = ns.wait_allocated("media").await;
        ns.create_pod("media-a", "media", "node-a", "Running").await;
        ns.delete("media").await;
        let held = ns.wait_reason("media", "Terminating").await;
        let message = condition(&held, "Ready").unwrap().message;
        assert!(message.contains("media-a"), "{message}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let still = ns
            .slices()
            .get("media")
            .await
            .expect("slice is held while its pod exists");
        assert_eq!(range_of(&still), Some(range));
        assert!(still.status.unwrap().drained_at.is_none());

        ns.delete_pod("media-a").await;
        ns.wait_gone("media", TIMEOUT).await;
        ns.wait_event("media", "Released").await;
    })
    .await;
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_the_cel_message() {
    with_namespace("invalid", |ns| async move {
        let both = PortSliceSpec {
            size: Some(10),
            ..exact_spec(5000, 5001)
        };
        let cases = [
            ("both", both, "set exactly one of spec.size"),
            (
                "reversed",
                exact_spec(6000, 5000),
                "ports.start must be less than or equal to ports.end",
            ),
            ("zero", size_spec(0), "spec.size"),
            ("huge", size_spec(70000), "spec.size"),
            (
                "not-a-cidr",
                PortSliceSpec {
                    allowed_sources: vec!["198.51.100.0/24".into(), "198.51.100.0/33".into()],
                    ..size_spec(10)
                },
                "allowedSources must be CIDRs",
            ),
        ];
        for (name, spec, needle) in cases {
            let err = ns.create(name, spec).await.expect_err(name);
            let text = err.to_string();
            assert!(text.contains(needle), "{name}: {text}");
            assert!(
                matches!(err, kube::Error::Api(ref s) if s.code == 422),
                "{name}: {err:?}"
            );
        }

        let _op = ns.operator(&[]);
        ns.create_size("fixed", 10).await;
        ns.wait_allocated("fixed").await;
        for change in [json!({"size": 20}), json!({"protocols": ["UDP"]})] {
            let err = ns
                .slices()
                .patch(
                    "fixed",
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": change })),
                )
                .await
                .expect_err("spec change after allocation");
            assert!(
                err.to_string().contains(
                    "spec.size, spec.ports and spec.protocols are immutable once a range is allocated"
                ),
                "{change}: {err}"
            );
        }
        // The source filter is no part of the allocation: it stays editable.
        ns.slices()
            .patch(
                "fixed",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"allowedSources": ["203.0.113.0/24"]}})),
            )
            .await
            .expect("editing allowedSources of an allocated slice");
    })
    .await;
}
