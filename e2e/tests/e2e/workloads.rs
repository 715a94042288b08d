//! The suite's namespace, PortSlices and workloads: slice `game` as a DaemonSet (a sliver on
//! every node), slice `web` as a Deployment, and `plain`, a DaemonSet in no slice.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use portslice_crds::{PortRange, PortSlice};
use portslice_e2e::manifests::{self, E2E_LABEL};
use portslice_e2e::{probe, shell};

use crate::ctx::{Ctx, PodAt, SHORT, wait_until};

pub const POD_READY: Duration = Duration::from_secs(180);

pub async fn create_namespace(ctx: &Ctx) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(ctx.client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ctx.ns, "labels": {E2E_LABEL: "true"}}
    }))?;
    nss.create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {}", ctx.ns))?;
    Ok(())
}

/// Plain pods (no slice) created after the install start on every node and resolve the
/// cluster's DNS: PortSlice in the chain costs a pod it has no business with nothing.
pub async fn plain_pods_everywhere(ctx: &mut Ctx) -> anyhow::Result<()> {
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    dss.create(
        &PostParams::default(),
        &manifests::agent_daemonset("plain", &ctx.ns, None, &ctx.s.agent_image)?,
    )
    .await?;
    let pods = ready_pods_on_every_node(ctx, "plain").await?;
    for p in &pods {
        let out = ctx
            .pod_exec(
                &p.name,
                &["nslookup", "kubernetes.default.svc.cluster.local"],
            )
            .await?;
        ensure!(
            out.contains("Address") && !out.contains("can't find"),
            "{} on {}: {out}",
            p.name,
            p.node
        );
    }
    ctx.pods.insert("plain".into(), pods);
    Ok(())
}

pub async fn create_slices(ctx: &mut Ctx) -> anyhow::Result<()> {
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    for (name, size) in [("game", 10), ("web", 20)] {
        api.create(
            &PostParams::default(),
            &manifests::slice_of_size(name, &ctx.ns, size),
        )
        .await?;
    }
    for (name, size) in [("game", 10u32), ("web", 20)] {
        let range = wait_range(&api, name, SHORT).await?;
        ensure!(
            range.len() == size,
            "slice {name} got {range}, want {size} ports"
        );
        ensure!(range.start >= 1024, "slice {name} got {range}, below 1024");
        ctx.slices.insert(name.to_string(), range);
    }
    let (a, b) = (ctx.range_of("game")?, ctx.range_of("web")?);
    ensure!(!a.overlaps(&b), "ranges overlap: game {a}, web {b}");
    Ok(())
}

pub async fn wait_range(
    api: &Api<PortSlice>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<PortRange> {
    wait_until(&format!("slice {name} to get a range"), timeout, || async {
        Ok(api.get(name).await?.status.and_then(|s| s.range))
    })
    .await
}

/// Slice `game` runs as a DaemonSet (a pod on every node), slice `web` as a Deployment kept off
/// the operator leader's node.
pub async fn create_slice_workloads(ctx: &mut Ctx) -> anyhow::Result<()> {
    let img = ctx.s.agent_image.clone();
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    dss.create(
        &PostParams::default(),
        &manifests::agent_daemonset("game", &ctx.ns, Some("game"), &img)?,
    )
    .await?;
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    deps.create(
        &PostParams::default(),
        &manifests::agent_deployment("web", &ctx.ns, "web", &img, ctx.leader_node.as_deref())?,
    )
    .await?;
    let game = ready_pods_on_every_node(ctx, "game").await?;
    ctx.pods.insert("game".into(), game);
    let web = ready_pods(ctx, "web", 1).await?;
    ctx.pods.insert("web".into(), web);
    Ok(())
}

/// The Ready pods of `app`, once there are `want` of them (on distinct nodes).
pub async fn ready_pods(ctx: &Ctx, app: &str, want: usize) -> anyhow::Result<Vec<PodAt>> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let lp = ListParams::default().labels(&format!("app={app}"));
    let res = wait_until(
        &format!("{want} Ready pod(s) of {app}"),
        POD_READY,
        || async {
            let mut ready = Vec::new();
            for p in api.list(&lp).await?.items {
                if p.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let is_ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
                if let (true, Some(name), Some(node)) = (is_ready, p.metadata.name, node) {
                    let n = ctx.node(&node)?;
                    let (node_ip, node_ip6) = (n.ip, n.ip6);
                    ready.push(PodAt {
                        name,
                        node,
                        node_ip,
                        node_ip6,
                    });
                }
            }
            ready.sort_by(|a, b| a.node.cmp(&b.node));
            Ok((ready.len() == want).then_some(ready))
        },
    )
    .await;
    if res.is_err() {
        // Say why: the CNI plugin's refusal or the image problem is in the pod's events.
        let out = shell::run(
            &ctx.kubectl(&[
                "-n",
                &ctx.ns,
                "describe",
                "pods",
                "-l",
                &format!("app={app}"),
            ]),
            None,
            SHORT,
        )
        .await;
        if let Ok(o) = out {
            let tail: Vec<&str> = o.stdout.lines().rev().take(10).collect();
            return res.with_context(|| {
                format!(
                    "pod events: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )
            });
        }
    }
    res
}

/// One Ready pod of `app` on each node.
pub async fn ready_pods_on_every_node(ctx: &Ctx, app: &str) -> anyhow::Result<Vec<PodAt>> {
    let pods = ready_pods(ctx, app, ctx.nodes.len()).await?;
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    ensure!(
        nodes.len() == ctx.nodes.len(),
        "{app} pods share nodes: {pods:?}"
    );
    Ok(pods)
}

/// The nodes in a slice's `status.slivers`, once it reports exactly `want` of them.
pub async fn slivers(ctx: &Ctx, slice: &str, want: usize) -> anyhow::Result<BTreeSet<String>> {
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    wait_until(
        &format!("slice {slice} to report {want} slivers"),
        Duration::from_secs(120),
        || async {
            let st = api.get(slice).await?.status.unwrap_or_default();
            let nodes: BTreeSet<String> = st.slivers.iter().map(|s| s.node.clone()).collect();
            Ok((st.sliver_count as usize == want && nodes.len() == want).then_some(nodes))
        },
    )
    .await
}

/// `kubectl get portslices` shows each slice's range and its number of slivers.
pub async fn get_portslices(ctx: &Ctx) -> anyhow::Result<()> {
    let want = [("game", ctx.nodes.len()), ("web", 1)];
    for (slice, n) in want {
        slivers(ctx, slice, n).await?;
    }
    let out = shell::run_ok(&ctx.kubectl(&["-n", &ctx.ns, "get", "portslices"]), SHORT).await?;
    let rows = probe::parse_get_portslices(&out);
    for (slice, n) in want {
        let range = ctx.range_of(slice)?;
        let row = rows
            .iter()
            .find(|(name, _, _)| name == slice)
            .with_context(|| format!("no row for {slice} in:\n{out}"))?;
        ensure!(
            row.1 == range.to_string() && row.2 == n.to_string(),
            "row for {slice} is {row:?}, want range {range} and {n} slivers:\n{out}"
        );
    }
    Ok(())
}

/// The DaemonSet slice has one sliver per node, all on the same range: every node's game pod
/// picks its ephemeral ports from that range, and status names every node once.
pub async fn one_sliver_per_node(ctx: &Ctx) -> anyhow::Result<()> {
    let range = ctx.range_of("game")?;
    let nodes = slivers(ctx, "game", ctx.nodes.len()).await?;
    let all: BTreeSet<String> = ctx.nodes.iter().map(|n| n.name.clone()).collect();
    ensure!(
        nodes == all,
        "game's slivers are on {nodes:?}, want every node {all:?}"
    );
    for p in ctx.pods_of("game")? {
        let got = ctx
            .pod_exec(&p.name, &["portslice-e2e-agent", "port-range"])
            .await?;
        ensure!(
            got.trim() == format!("{} {}", range.start, range.end),
            "{} on {} has ip_local_port_range {got:?}, want game's {range}",
            p.name,
            p.node
        );
    }
    Ok(())
}

/// A deleted slice keeps its range while a pod of it runs; only when the pods are gone (plus
/// the quarantine) does the range go back, here to a slice that asked for exactly those ports.
pub async fn deleted_slice_keeps_range(ctx: &Ctx) -> anyhow::Result<()> {
    let web = ctx.range_of("web")?;
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    api.create(
        &PostParams::default(),
        &manifests::slice_of_ports("claim", &ctx.ns, web),
    )
    .await?;
    api.delete("web", &DeleteParams::default()).await?;
    // While web's pod runs: web still exists, terminating, with its range; claim gets nothing.
    let hold = Instant::now() + Duration::from_secs(8);
    while Instant::now() < hold {
        let w = api
            .get_opt("web")
            .await?
            .context("slice web vanished while its pod still runs")?;
        ensure!(
            w.metadata.deletion_timestamp.is_some(),
            "slice web is not terminating"
        );
        ensure!(
            w.status.and_then(|s| s.range) == Some(web),
            "slice web lost its range while its pod runs"
        );
        let c = api.get("claim").await?;
        ensure!(
            c.status.and_then(|s| s.range).is_none(),
            "slice claim got {web} while web's pod still runs"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    deps.delete("web", &DeleteParams::foreground()).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let lp = ListParams::default().labels("app=web");
    wait_until("web's pods to be gone", Duration::from_secs(60), || async {
        Ok(pods.list(&lp).await?.items.is_empty().then_some(()))
    })
    .await?;
    wait_until("slice web to be gone", Duration::from_secs(60), || async {
        Ok(api.get_opt("web").await?.is_none().then_some(()))
    })
    .await?;
    let got = wait_range(&api, "claim", Duration::from_secs(60)).await?;
    ensure!(got == web, "slice claim got {got}, want the freed {web}");
    Ok(())
}

/// Removes everything the suite created; the workloads first, so their CNI DEL still finds the
/// plugin, and the slices through the operator (still installed).
pub async fn cleanup_namespace(ctx: &Ctx) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(ctx.client.clone());
    if nss.get_opt(&ctx.ns).await?.is_none() {
        return Ok(());
    }
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let lp = ListParams::default().labels(&format!("{E2E_LABEL}=true"));
    dss.delete_collection(&DeleteParams::foreground(), &lp)
        .await?;
    deps.delete_collection(&DeleteParams::foreground(), &lp)
        .await?;
    pods.delete_collection(&DeleteParams::default(), &lp)
        .await?;
    wait_until("e2e pods to be gone", Duration::from_secs(120), || async {
        Ok(pods.list(&lp).await?.items.is_empty().then_some(()))
    })
    .await?;
    nss.delete(&ctx.ns, &DeleteParams::default()).await?;
    let gone = wait_until(
        "the e2e namespace to be gone",
        Duration::from_secs(60),
        || async { Ok(nss.get_opt(&ctx.ns).await?.is_none().then_some(())) },
    )
    .await;
    if gone.is_ok() {
        return Ok(());
    }
    // The operator did not release them: drop the finalizers so no test object outlives the run,
    // and say so (the checks above have already reported why).
    let slices: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    for s in slices.list(&ListParams::default()).await?.items {
        let name = s.metadata.name.unwrap_or_default();
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        slices
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    wait_until(
        "the e2e namespace to be gone (finalizers dropped)",
        Duration::from_secs(60),
        || async { Ok(nss.get_opt(&ctx.ns).await?.is_none().then_some(())) },
    )
    .await?;
    bail!("the operator did not release the slices' finalizers; dropped them by hand")
}

/// Which slice pod answers on each node for `slice`: node name -> pod name.
pub fn pod_by_node(pods: &[PodAt]) -> BTreeMap<&str, &PodAt> {
    pods.iter().map(|p| (p.node.as_str(), p)).collect()
}
