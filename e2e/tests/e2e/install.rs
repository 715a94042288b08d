//! The chart's life: install, the operator's Lease, the node daemons in every node's CNI chain,
//! upgrade, uninstall and what it must leave behind.
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use portslice_e2e::shell;

use crate::ctx::{Ctx, LONG, SHORT, wait_until};
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

/// `helm install` as the README's quickstart does it (no `--set`), plus the suite's values file
/// (a short quarantine and retry interval, a reservation for its namespace) and what the
/// settings ask for; then waits for every replica.
pub async fn helm_install(ctx: &Ctx) -> anyhow::Result<()> {
    let s = &ctx.s;
    let chart = s.chart.to_string_lossy().into_owned();
    let uplink = s.uplink.as_ref().map(|u| format!("node.uplink={u}"));
    let values = concat!(env!("CARGO_MANIFEST_DIR"), "/values-e2e.yaml");
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
        "-f",
        values,
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

/// Installed with nothing set about the cluster: every node daemon found its uplink (the
/// interface holding its address) and the cluster CIDRs (the Nodes' pod CIDRs, the ServiceCIDR
/// objects'), and wrote the CIDRs into its conflist entry; it says so in its metrics.
pub async fn detected_uplink_and_cidrs(ctx: &Ctx) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Node as KubeNode;
    use k8s_openapi::api::networking::v1::ServiceCIDR;
    let service: Vec<String> = Api::<ServiceCIDR>::all(ctx.client.clone())
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.spec?.cidrs)
        .flatten()
        .collect();
    let pod: Vec<String> = Api::<KubeNode>::all(ctx.client.clone())
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.spec?.pod_cidrs)
        .flatten()
        .collect();
    ensure!(
        !service.is_empty() && !pod.is_empty(),
        "nothing to detect from"
    );
    for node in &ctx.nodes {
        let n = node.name.as_str();
        let cidrs = wait_until(
            &format!("{n}'s conflist entry to carry the CIDRs"),
            SHORT,
            || async {
                let conflist = first_conflist(ctx, n).await?;
                let v: serde_json::Value =
                    serde_json::from_str(&ctx.on_node(n, &["cat", &conflist]).await?)?;
                let entry = v["plugins"]
                    .as_array()
                    .and_then(|a| a.iter().find(|p| p["type"] == "portslice"))
                    .cloned()
                    .unwrap_or_default();
                let cidrs: Vec<String> = entry["clusterCIDRs"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                // Every node's pod CIDR inside one entry (the daemon aggregates them), and the
                // service CIDRs as the API has them.
                let covered = pod.iter().all(|p| cidrs.iter().any(|c| covers(c, p)));
                let services = service.iter().all(|s| cidrs.contains(s));
                Ok((covered && services).then_some(cidrs))
            },
        )
        .await?;
        let metrics = http_get(SocketAddrV4::new(node.ip, 9465), "/metrics").await?;
        let uplink = metrics
            .lines()
            .find(|l| l.starts_with("portslice_node_uplink_info{"))
            .context("no portslice_node_uplink_info")?
            .to_string();
        ensure!(uplink.contains("source=\"detected\""), "{n}: {uplink}");
        eprintln!("[e2e] detected on {n}: {uplink}; clusterCIDRs {cidrs:?}");
    }
    Ok(())
}

/// Whether CIDR `outer` covers CIDR `inner` (IPv4).
/// Whether CIDR `outer` contains CIDR `inner` (same family).
fn covers(outer: &str, inner: &str) -> bool {
    let parse = |c: &str| -> Option<(u128, u32, u32)> {
        let (ip, len) = c.split_once('/')?;
        let (addr, bits) = match ip.parse::<std::net::IpAddr>().ok()? {
            std::net::IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            std::net::IpAddr::V6(a) => (u128::from(a), 128),
        };
        Some((addr, bits, len.parse().ok()?))
    };
    match (parse(outer), parse(inner)) {
        // A /0 covers its whole family (and a shift by the full width would overflow).
        (Some((_, ob, 0)), Some((_, ib, _))) => ob == ib,
        (Some((o, ob, ol)), Some((i, ib, il))) if ob == ib && ol <= il && ol <= ob => {
            o >> (ob - ol) == i >> (ob - ol)
        }
        _ => false,
    }
}

/// The Grafana dashboard the chart shipped (the ConfigMap labelled `grafana_dashboard`) queries
/// only metrics the installed binaries export: every `portslice_*` name in its panels appears
/// on the operator's /metrics (through its Service, from a node) or a node daemon's.
pub async fn dashboard_queries_only_exported_metrics(ctx: &Ctx) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{ConfigMap, Service};
    use portslice_e2e::metrics::{dashboard_metrics, exported_metrics};
    let ns = &ctx.s.release_namespace;
    let by_label = |l: &str| kube::api::ListParams::default().labels(l);
    let cms = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .list(&by_label("grafana_dashboard=1"))
        .await?;
    let cm = cms
        .items
        .first()
        .context("no ConfigMap labelled grafana_dashboard=1")?;
    let json = cm
        .data
        .as_ref()
        .and_then(|d| d.values().next())
        .context("the dashboard ConfigMap is empty")?;
    let wanted = dashboard_metrics(json).map_err(anyhow::Error::msg)?;
    let svcs = Api::<Service>::namespaced(ctx.client.clone(), ns)
        .list(&by_label("app.kubernetes.io/component=operator"))
        .await?;
    let svc = svcs.items.first().context("no operator metrics Service")?;
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .context("the operator Service has no ClusterIP")?;
    let node = &ctx.nodes[0];
    let url = format!("http://{}/metrics", host_port(&ip, 8080));
    let operator = ctx
        .on_node(&node.name, &["curl", "-sf", "--max-time", "5", &url])
        .await
        .context("scraping the operator")?;
    let daemon = http_get(SocketAddrV4::new(node.ip, 9465), "/metrics").await?;
    let mut exported = exported_metrics(&operator);
    exported.extend(exported_metrics(&daemon));
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(*m)).collect();
    ensure!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which neither the operator nor the node daemon exports"
    );
    eprintln!(
        "[e2e] the dashboard's {} metrics are all exported ({} exported in all)",
        wanted.len(),
        exported.len()
    );
    Ok(())
}

fn host_port(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// A plain HTTP/1.0 GET (the daemon's metrics on a node address).
async fn http_get(addr: SocketAddrV4, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::time::timeout(SHORT, tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    tokio::time::timeout(SHORT, s.read_to_string(&mut body))
        .await
        .context("read timed out")??;
    Ok(body)
}
