//! The chart's life: install, the operator's Lease, the node daemons in every node's CNI chain,
//! upgrade, uninstall and what it must leave behind.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use portslice_e2e::shell;

use crate::ctx::{Ctx, LONG, SHORT, SUITE_NAMESPACE, SUITE_RESERVATIONS, wait_until};
use crate::traffic;

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The release must not exist before the suite: the nodes' state before install is what
/// uninstall must restore.
pub async fn start_without_release(ctx: &Ctx) -> anyhow::Result<()> {
    let rel = [
        ctx.s.release.as_str(),
        "-n",
        ctx.s.release_namespace.as_str(),
    ];
    if shell::run(&ctx.helm(&[&["status"][..], &rel].concat()), None, SHORT)
        .await?
        .success()
    {
        eprintln!(
            "[e2e] release {} exists: uninstalling it first",
            ctx.s.release
        );
        shell::run_ok(
            &ctx.helm(&[&["uninstall", "--wait"][..], &rel].concat()),
            LONG,
        )
        .await?;
    }
    release_namespace_gone(ctx).await
}

pub async fn release_exists(ctx: &Ctx) -> anyhow::Result<bool> {
    let rel = [
        ctx.s.release.as_str(),
        "-n",
        ctx.s.release_namespace.as_str(),
    ];
    Ok(
        shell::run(&ctx.helm(&[&["status"][..], &rel].concat()), None, SHORT)
            .await?
            .success(),
    )
}

/// Every node's ip_local_reserved_ports.
pub async fn reserved_ports(ctx: &Ctx) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for n in &ctx.nodes {
        if let Ok(v) = ctx.on_node(&n.name, &["cat", RESERVED_PORTS]).await {
            out.insert(n.name.clone(), v.trim().to_string());
        }
    }
    out
}

/// `helm install` as the README's quickstart does it, plus what makes the suite fast (a short
/// quarantine and retry interval) and what the settings ask for; then waits for every replica.
pub async fn helm_install(ctx: &Ctx) -> anyhow::Result<()> {
    let s = &ctx.s;
    let chart = s.chart.to_string_lossy().into_owned();
    let uplink = s.uplink.as_ref().map(|u| format!("node.uplink={u}"));
    let reservation_ports = format!("reservations[0].ports={SUITE_RESERVATIONS}");
    let reservation_namespace = format!("reservations[0].namespaces[0]={SUITE_NAMESPACE}");
    let mut args = vec![
        "upgrade",
        "--install",
        &s.release,
        &chart,
        "-n",
        &s.release_namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
        // Short quarantine and retry so the slice-deletion check finishes in seconds.
        "--set",
        "operator.quarantine=3s",
        "--set",
        "operator.extraArgs={--retry-interval=2s}",
        // The suite reserves exact ports of the pool in its own namespace.
        "--set-string",
        &reservation_ports,
        "--set-string",
        &reservation_namespace,
    ];
    if let Some(u) = &uplink {
        args.extend(["--set", u.as_str()]);
    }
    for set in &s.helm_sets {
        args.extend(["--set", set.as_str()]);
    }
    shell::run_ok(&ctx.helm(&args), LONG).await?;
    release_ready(ctx).await
}

/// helm --wait accepts a DaemonSet with maxUnavailable pods not ready: wait for all of them.
pub async fn release_ready(ctx: &Ctx) -> anyhow::Result<()> {
    let ns = &ctx.s.release_namespace;
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), ns);
    wait_until(
        "2 available operator replicas",
        Duration::from_secs(180),
        || async {
            let list = deploys
                .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
                .await?;
            let d = list.items.first().context("no operator Deployment")?;
            let available = d
                .status
                .as_ref()
                .and_then(|st| st.available_replicas)
                .unwrap_or(0);
            Ok((available >= 2).then_some(()))
        },
    )
    .await?;
    let nodes = ctx.nodes.len() as i32;
    wait_until(
        "the node DaemonSet ready on every node",
        Duration::from_secs(180),
        || async {
            let list = dss
                .list(&ListParams::default().labels("app.kubernetes.io/component=node"))
                .await?;
            let ds = list.items.first().context("no node DaemonSet")?;
            let st = ds.status.clone().context("node DaemonSet has no status")?;
            let done = st.desired_number_scheduled == nodes
                && st.number_ready == nodes
                && st.updated_number_scheduled == Some(nodes);
            Ok(done.then_some(()))
        },
    )
    .await
}

/// An operator pod holds the Lease; returns the node it runs on.
pub async fn leader_node(ctx: &Ctx) -> anyhow::Result<String> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.s.release_namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.s.release_namespace);
    wait_until(
        "an operator pod to hold the leader Lease",
        SHORT,
        || async {
            let operators = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
                .await?
                .items;
            let all = leases.list(&ListParams::default()).await?;
            Ok(all.items.into_iter().find_map(|l| {
                let holder = l.spec?.holder_identity?;
                let pod = operators
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(holder.as_str()))?;
                pod.spec.as_ref()?.node_name.clone()
            }))
        },
    )
    .await
}

/// On every node: portslice is the last plugin of the conflist the runtime loads, its binary is
/// in the CNI bin dir and the datapath is pinned.
pub async fn cni_chain_on_every_node(ctx: &Ctx) -> anyhow::Result<()> {
    for node in &ctx.nodes {
        let n = node.name.as_str();
        wait_until(
            &format!("the portslice plugin in {n}'s conflist"),
            SHORT,
            || async {
                let conflist = first_conflist(ctx, n).await?;
                let text = ctx.on_node(n, &["cat", &conflist]).await?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {conflist} on {n}"))?;
                let types: Vec<&str> = v["plugins"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p["type"].as_str()).collect())
                    .unwrap_or_default();
                Ok((types.last() == Some(&"portslice")).then_some(()))
            },
        )
        .await?;
        ensure!(
            ctx.node_exists(n, &format!("{}/portslice", ctx.s.cni_bin_dir))
                .await?,
            "{n}: plugin binary missing from the CNI bin dir"
        );
        ensure!(
            ctx.node_exists(n, &ctx.s.pin_root).await?,
            "{n}: no BPF pins under {}",
            ctx.s.pin_root
        );
    }
    Ok(())
}

/// The file libcni (and containerd with max_conf_num 1) loads on `node`: the first by name.
async fn first_conflist(ctx: &Ctx, node: &str) -> anyhow::Result<String> {
    let out = ctx.on_node(node, &["ls", &ctx.s.cni_conf_dir]).await?;
    let mut names: Vec<&str> = out
        .lines()
        .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf"))
        .collect();
    names.sort();
    let first = names
        .first()
        .with_context(|| format!("no CNI config on {node}"))?;
    Ok(format!("{}/{first}", ctx.s.cni_conf_dir))
}

/// An upgrade restarts every node daemon; the pinned datapath keeps serving the slices.
pub async fn helm_upgrade(ctx: &Ctx) -> anyhow::Result<()> {
    let s = &ctx.s;
    let chart = s.chart.to_string_lossy().into_owned();
    shell::run_ok(
        &ctx.helm(&[
            "upgrade",
            &s.release,
            &chart,
            "-n",
            &s.release_namespace,
            "--reuse-values",
            "--set",
            "logLevel=debug",
            "--wait",
            "--timeout",
            "5m",
        ]),
        LONG,
    )
    .await?;
    release_ready(ctx).await?;
    traffic::remote_reaches(ctx, "tcp").await
}

/// After `helm uninstall`, every node is as before the install: no conflist entry, binary,
/// pins or kubeconfig, and ip_local_reserved_ports as it was.
pub async fn helm_uninstall_clean(ctx: &Ctx) -> anyhow::Result<()> {
    let s = &ctx.s;
    shell::run_ok(
        &ctx.helm(&[
            "uninstall",
            &s.release,
            "-n",
            &s.release_namespace,
            "--wait",
            "--timeout",
            "3m",
        ]),
        LONG,
    )
    .await?;
    let mut dirty = Vec::new();
    let after = reserved_ports(ctx).await;
    for node in &ctx.nodes {
        let n = node.name.as_str();
        if let Ok(conflist) = first_conflist(ctx, n).await {
            let text = ctx.on_node(n, &["cat", &conflist]).await?;
            if text.contains("\"portslice\"") {
                dirty.push(format!("{n}: {conflist} still lists the portslice plugin"));
            }
        }
        for path in [
            format!("{}/portslice", s.cni_bin_dir),
            s.pin_root.clone(),
            format!("{}/portslice.kubeconfig", s.cni_conf_dir),
        ] {
            if ctx.node_exists(n, &path).await? {
                dirty.push(format!("{n}: {path} is still there"));
            }
        }
        if after.get(n) != ctx.reserved_before.get(n) {
            dirty.push(format!(
                "{n}: ip_local_reserved_ports is {:?}, was {:?} before install",
                after.get(n),
                ctx.reserved_before.get(n)
            ));
        }
    }
    release_namespace_gone(ctx).await?;
    ensure!(
        dirty.is_empty(),
        "not clean after helm uninstall: {}",
        dirty.join("; ")
    );
    Ok(())
}

/// Deletes the release namespace and waits until it is gone, so the next install starts clean.
pub async fn release_namespace_gone(ctx: &Ctx) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(ctx.client.clone());
    let name = &ctx.s.release_namespace;
    if nss.get_opt(name).await?.is_some() {
        let _ = nss.delete(name, &DeleteParams::default()).await;
    }
    wait_until(
        &format!("namespace {name} to be gone"),
        Duration::from_secs(120),
        || async { Ok(nss.get_opt(name).await?.is_none().then_some(())) },
    )
    .await
}
