//! What only several nodes can show: the operator's leader apart from the slice pods, a drained
//! node's sliver moving, and a deleted node's sliver leaving the status.
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::{Api, DeleteParams, PostParams};
use portslice_e2e::shell;

use crate::ctx::{Ctx, LONG, list_nodes, wait_until};
use crate::install;
use crate::traffic::remote_answer;
use crate::workloads::{ready_pods, ready_pods_on_every_node, slivers};

/// The leader allocated for slice pods on other nodes: web never runs on the leader's node, and
/// its slice works there.
pub async fn leader_apart_from_slice_pods(ctx: &Ctx) -> anyhow::Result<()> {
    let leader = ctx.leader_node.as_deref().context("no leader node known")?;
    let web = &ctx.pods_of("web")?[0];
    ensure!(
        web.node != leader,
        "web's pod runs on the leader's node {leader}"
    );
    let a = remote_answer(ctx, web.node_ip, "web").await?;
    ensure!(
        a.name == web.name,
        "web on {} answered as {}",
        web.node,
        a.name
    );
    Ok(())
}

/// `kubectl drain` of web's node: its pod comes up on another node, `status.slivers` follows,
/// and the slice answers at the new node's address.
pub async fn drain_moves_sliver(ctx: &mut Ctx) -> anyhow::Result<()> {
    let old = ctx.pods_of("web")?[0].clone();
    let drain = ctx.kubectl(&[
        "drain",
        &old.node,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        "--timeout=180s",
    ]);
    let uncordon = ctx.kubectl(&["uncordon", &old.node]);
    let result = async {
        shell::run_ok(&drain, LONG).await?;
        let moved = wait_until(
            "web's pod on another node",
            Duration::from_secs(180),
            || async {
                let pods = ready_pods(ctx, "web", 1).await?;
                Ok(pods.into_iter().find(|p| p.node != old.node))
            },
        )
        .await?;
        let nodes = slivers(ctx, "web", 1).await?;
        ensure!(
            nodes.contains(&moved.node),
            "web's sliver is on {nodes:?}, its pod now runs on {}",
            moved.node
        );
        let a = remote_answer(ctx, moved.node_ip, "web").await?;
        ensure!(
            a.name == moved.name,
            "web at {} answered as {}",
            moved.node_ip,
            a.name
        );
        Ok(moved)
    }
    .await;
    shell::run_ok(&uncordon, LONG).await?;
    install::release_ready(ctx).await?;
    let moved = result?;
    ctx.pods.insert("web".into(), vec![moved]);
    Ok(())
}

/// A node deleted from the cluster leaves no sliver behind in status. The node is then brought
/// back (its kubelet registers it again) and the suite's DaemonSets are whole again.
pub async fn deleted_node_leaves_no_sliver(ctx: &mut Ctx) -> anyhow::Result<()> {
    let web_node = ctx.pods_of("web")?[0].node.clone();
    let victim = ctx
        .nodes
        .iter()
        .find(|n| {
            !n.control_plane && n.name != web_node && Some(&n.name) != ctx.leader_node.as_ref()
        })
        .or_else(|| {
            ctx.nodes
                .iter()
                .find(|n| !n.control_plane && n.name != web_node)
        })
        .context("no worker without web's pod to delete")?
        .clone();
    let api: Api<KubeNode> = Api::all(ctx.client.clone());
    let saved = api.get(&victim.name).await?;
    api.delete(&victim.name, &DeleteParams::default()).await?;
    let left = ctx.nodes.len() - 1;
    let gone = slivers(ctx, "game", left).await;
    // Bring the node back whatever the check saw: the rest of the suite needs it.
    let back = restore_node(ctx, &saved).await;
    let nodes = gone?;
    ensure!(
        !nodes.contains(&victim.name),
        "game still lists a sliver on the deleted {}",
        victim.name
    );
    back?;
    let game = ready_pods_on_every_node(ctx, "game").await?;
    ctx.pods.insert("game".into(), game);
    slivers(ctx, "game", ctx.nodes.len()).await?;
    Ok(())
}

/// Brings a deleted node back under its old identity: the Node object again with its podCIDR
/// (the primary CNI's routes on every node point that CIDR at it; a fresh registration would get
/// another), then its kubelet restarted so it takes the object over. Waits for it and the
/// DaemonSets.
async fn restore_node(ctx: &mut Ctx, saved: &KubeNode) -> anyhow::Result<()> {
    let name = saved
        .metadata
        .name
        .clone()
        .context("a node without a name")?;
    let spec = saved.spec.clone().unwrap_or_default();
    let cidr = spec.pod_cidr.clone().context("the node had no podCIDR")?;
    let node: KubeNode = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": saved.metadata.labels},
        "spec": {"podCIDR": spec.pod_cidr, "podCIDRs": spec.pod_cidrs, "taints": spec.taints},
    }))?;
    let api: Api<KubeNode> = Api::all(ctx.client.clone());
    api.create(&PostParams::default(), &node).await?;
    ctx.on_node(&name, &["systemctl", "restart", "kubelet"])
        .await?;
    let got = wait_until(
        &format!("node {name} to be Ready again"),
        Duration::from_secs(180),
        || async {
            let Some(n) = api.get_opt(&name).await? else {
                return Ok(None);
            };
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok(ready.then(|| n.spec.and_then(|s| s.pod_cidr)).flatten())
        },
    )
    .await?;
    if got != cidr {
        bail!(
            "{name} came back with podCIDR {got}, not {cidr}: the primary CNI's routes no longer match"
        );
    }
    ctx.nodes = list_nodes(&ctx.client).await?;
    install::release_ready(ctx).await
}
