//! The PortSlice end-to-end scenario on a real multi-node cluster, as a user lives it: `helm
//! install`; plain pods everywhere; PortSlices and workloads annotated into them (a DaemonSet
//! with a sliver on every node, a Deployment); traffic from the remote host and between nodes;
//! upgrade; drain and delete a node; delete a slice; `helm uninstall`; every node clean.
//!
//! Runs against the current kubeconfig (`KUBECONFIG`), only when `PORTSLICE_E2E=1`
//! (`e2e/scripts/test-e2e.sh` sets it; settings in `portslice_e2e::settings`, the nodes from the
//! API server). Each check is named and reported; a check that needs another runs only when that
//! one passed (by name); `PORTSLICE_E2E_SKIP=a,b` skips checks by name, loudly. Everything the
//! suite creates is removed at the end, pass or fail.
mod ctx;
mod install;
mod names;
mod nodes;
mod policy;
mod traffic;
mod workloads;

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context as _;
use kube::Client;
use portslice_e2e::report::Report;
use portslice_e2e::settings::Settings;

use ctx::{Ctx, SUITE_NAMESPACE, list_nodes};

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var("PORTSLICE_E2E").as_deref() != Ok("1") {
        eprintln!(
            "[e2e] SKIPPED: set PORTSLICE_E2E=1 to run against the current kubeconfig (e2e/scripts/test-e2e.sh does)"
        );
        return ExitCode::SUCCESS;
    }
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[e2e] could not start: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<bool> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let s = Settings::from_lookup(
        |k| std::env::var(k).ok(),
        env!("CARGO_BIN_EXE_portslice-e2e-agent").into(),
        repo,
    )?;
    let client = Client::try_default()
        .await
        .context("connecting with the current kubeconfig")?;
    let nodes = list_nodes(&client).await?;
    eprintln!(
        "[e2e] nodes: {}",
        nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut ctx = Ctx {
        s,
        client,
        // Fixed: the reservations policy the suite installs names it.
        ns: SUITE_NAMESPACE.to_string(),
        nodes,
        reserved_before: BTreeMap::new(),
        slices: BTreeMap::new(),
        pods: BTreeMap::new(),
        leader_node: None,
    };
    let mut r = Report::new(&std::env::var("PORTSLICE_E2E_SKIP").unwrap_or_default());

    install::start_without_release(&ctx).await?;
    ctx.reserved_before = install::reserved_ports(&ctx).await;
    r.check("helm-install", || install::helm_install(&ctx))
        .await;
    scenario(&mut ctx, &mut r).await;

    // Workloads go before the chart: their CNI DEL must still find the plugin in the chain.
    if let Err(e) = workloads::cleanup_namespace(&ctx).await {
        eprintln!("[e2e] warning: cleaning up namespace {}: {e:#}", ctx.ns);
    }
    if install::release_exists(&ctx).await? {
        r.check("helm-uninstall-leaves-every-node-clean", || {
            install::helm_uninstall_clean(&ctx)
        })
        .await;
    } else {
        r.not_run(
            "helm-uninstall-leaves-every-node-clean",
            "no release to uninstall",
        );
    }
    eprintln!("{}", r.summary());
    Ok(r.failed() == 0)
}

/// Everything between install and uninstall. A check runs only when the checks it names passed.
async fn scenario(ctx: &mut Ctx, r: &mut Report) {
    const INSTALLED: &[&str] = &["helm-install"];
    const SLICE_PODS: &[&str] = &["slice-pods-run"];
    r.check_after("operator-holds-leader-lease", INSTALLED, || async {
        ctx.leader_node = Some(install::leader_node(ctx).await?);
        Ok(())
    })
    .await;
    r.check_after(
        "node-daemon-joins-cni-chain-on-every-node",
        INSTALLED,
        || install::cni_chain_on_every_node(ctx),
    )
    .await;
    r.check_after(
        "node-daemons-detect-their-uplink-and-the-cluster-cidrs",
        INSTALLED,
        || install::detected_uplink_and_cidrs(ctx),
    )
    .await;
    let created = r
        .check_after("suite-namespace", INSTALLED, || {
            workloads::create_namespace(ctx)
        })
        .await;
    if !created {
        return;
    }
    r.check_after(
        "plain-pods-start-on-every-node-and-resolve-dns",
        INSTALLED,
        || workloads::plain_pods_everywhere(ctx),
    )
    .await;
    r.check_after("slices-get-disjoint-ranges", INSTALLED, || {
        workloads::create_slices(ctx)
    })
    .await;
    r.check_after("slice-pods-run", &["slices-get-disjoint-ranges"], || {
        workloads::create_slice_workloads(ctx)
    })
    .await;
    r.check_after(
        "kubectl-get-portslices-shows-ranges-and-slivers",
        SLICE_PODS,
        || workloads::get_portslices(ctx),
    )
    .await;
    r.check_after(
        "grafana-dashboard-queries-only-exported-metrics",
        SLICE_PODS,
        || install::dashboard_queries_only_exported_metrics(ctx),
    )
    .await;
    r.check_after(
        "daemonset-slice-has-one-sliver-per-node-on-one-range",
        SLICE_PODS,
        || workloads::one_sliver_per_node(ctx),
    )
    .await;
    r.check_after(
        "operator-leader-runs-apart-from-slice-pods",
        &["slice-pods-run", "operator-holds-leader-lease"],
        || nodes::leader_apart_from_slice_pods(ctx),
    )
    .await;
    r.check_after(
        "remote-reaches-slice-pods-on-every-node-tcp",
        SLICE_PODS,
        || traffic::remote_reaches(ctx, "tcp"),
    )
    .await;
    r.check_after(
        "remote-reaches-slice-pods-on-every-node-udp",
        SLICE_PODS,
        || traffic::remote_reaches(ctx, "udp"),
    )
    .await;
    r.check_after(
        "pods-reach-slice-ports-of-every-node",
        &[
            "slice-pods-run",
            "plain-pods-start-on-every-node-and-resolve-dns",
        ],
        || traffic::pods_reach_slice_ports_on_every_node(ctx),
    )
    .await;
    r.check_after(
        "slice-pods-reach-each-other-across-nodes",
        SLICE_PODS,
        || traffic::slice_pods_reach_each_other_across_nodes(ctx),
    )
    .await;
    let remote = traffic::start_remote_agent(ctx);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    match &remote {
        Ok(agent) => {
            r.check_after("slice-pods-reach-remote-from-own-ports", SLICE_PODS, || {
                traffic::pods_reach_remote(ctx)
            })
            .await;
            match ctx.dual_stack() {
                Some(remote6) => {
                    r.check_after("remote-reaches-slice-pods-on-node-ipv6", SLICE_PODS, || {
                        traffic::remote_reaches_ipv6(ctx, remote6)
                    })
                    .await;
                    r.check_after(
                        "slice-pods-reach-remote-ipv6-from-own-ports",
                        SLICE_PODS,
                        || traffic::pods_reach_remote_ipv6(ctx, remote6),
                    )
                    .await;
                }
                None => {
                    for c in [
                        "remote-reaches-slice-pods-on-node-ipv6",
                        "slice-pods-reach-remote-ipv6-from-own-ports",
                    ] {
                        r.not_run(c, "single-stack cluster (no PORTSLICE_E2E_REMOTE_IP6, or a node without an IPv6 address)");
                    }
                }
            }
            r.check_after("slice-pods-cannot-use-foreign-ports", SLICE_PODS, || {
                traffic::foreign_ports_blocked(ctx, agent)
            })
            .await;
        }
        Err(e) => {
            for c in [
                "slice-pods-reach-remote-from-own-ports",
                "slice-pods-cannot-use-foreign-ports",
            ] {
                r.not_run(c, &format!("the remote agent did not start: {e:#}"));
            }
        }
    }
    drop(remote);
    r.check_after("slice-pods-resolve-cluster-dns", SLICE_PODS, || {
        traffic::pods_resolve(ctx)
    })
    .await;
    r.check_after(
        "host-ports-outside-slices-stay-with-host",
        INSTALLED,
        || traffic::host_ports_stay_with_host(ctx),
    )
    .await;
    const PLAIN_PODS: &[&str] = &["plain-pods-start-on-every-node-and-resolve-dns"];
    const COTURN: &str = "coturn-configured-from-its-configmap-found-by-srv-relays-turn";
    r.check_after(COTURN, PLAIN_PODS, || names::coturn_found_by_srv(ctx))
        .await;
    if ctx.dual_stack().is_some() {
        r.check_after("dns-aaaa-names-the-slivers-ipv6-address", &[COTURN], || {
            names::aaaa_names_the_slivers_ipv6_address(ctx)
        })
        .await;
    } else {
        r.not_run(
            "dns-aaaa-names-the-slivers-ipv6-address",
            "single-stack cluster",
        );
    }
    r.check_after("dns-records-follow-the-slivers", &[COTURN], || {
        names::records_follow_slivers(ctx)
    })
    .await;
    r.check_after("helm-upgrade-keeps-slices-serving", SLICE_PODS, || {
        install::helm_upgrade(ctx)
    })
    .await;
    r.check_after("draining-a-node-moves-its-sliver", SLICE_PODS, || {
        nodes::drain_moves_sliver(ctx)
    })
    .await;
    r.check_after("deleted-node-leaves-no-sliver", SLICE_PODS, || {
        nodes::deleted_node_leaves_no_sliver(ctx)
    })
    .await;
    r.check_after(
        "deleted-slice-keeps-range-until-pods-gone",
        SLICE_PODS,
        || workloads::deleted_slice_keeps_range(ctx),
    )
    .await;
    r.check_after(
        "a-namespace-admin-creates-size-slices-not-forbidden-reservations",
        INSTALLED,
        || policy::tenant_admin(ctx),
    )
    .await;
    r.check_after(
        "a-running-pods-slice-annotation-cannot-change",
        SLICE_PODS,
        || policy::annotation_is_fixed(ctx),
    )
    .await;
    r.check_after(
        "a-host-listener-makes-its-node-refuse-the-slice",
        INSTALLED,
        || policy::host_listener_refuses(ctx),
    )
    .await;
    r.check_after(
        "allowed-sources-let-in-only-listed-remotes-and-follow-edits",
        INSTALLED,
        || policy::allowed_sources_follow_edits(ctx),
    )
    .await;
}
