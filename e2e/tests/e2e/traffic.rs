//! Traffic, as the connectivity matrix (docs/DESIGN.md) has it, across real nodes: the remote
//! host (kind: the docker host) to slice pods at their node's address, pods to other nodes'
//! slice ports, slice pods to the remote from their own ports, the ports they may not use, and
//! the host's own ports.
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use portslice_e2e::{manifests, probe, shell};

use crate::ctx::{Ctx, PodAt, REMOTE_PORT, wait_until};
use crate::workloads::{self, pod_by_node};

/// Rows 1 and 7 across nodes: from the remote host, every node's address on the first two ports
/// of each slice answers with that slice's pod on that node, which sees the remote's real address.
pub async fn remote_reaches(ctx: &Ctx, proto: &str) -> anyhow::Result<()> {
    remote_reaches_on(
        ctx,
        proto,
        |p| Some(p.node_ip.into()),
        ctx.s.remote_ip.into(),
    )
    .await
}

/// [`remote_reaches`] on the node addresses `node_addr` picks, from the remote's `remote`.
async fn remote_reaches_on(
    ctx: &Ctx,
    proto: &str,
    node_addr: fn(&PodAt) -> Option<IpAddr>,
    remote: IpAddr,
) -> anyhow::Result<()> {
    for slice in ["game", "web"] {
        let range = ctx.range_of(slice)?;
        for pod in ctx.pods_of(slice)? {
            let ip = node_addr(pod)
                .with_context(|| format!("{} has no address of the family", pod.node))?;
            for port in [range.start, range.start + 1] {
                let addr = SocketAddr::new(ip, port);
                let a = ctx
                    .remote_dial(proto, addr)
                    .await
                    .with_context(|| format!("slice {slice} on {}", pod.node))?;
                ensure!(
                    a.name == pod.name,
                    "{proto} {addr} answered by {}, want {} (slice {slice} on {})",
                    a.name,
                    pod.name,
                    pod.node
                );
                ensure!(
                    a.peer.ip() == remote,
                    "{} saw the remote as {}, want {remote} (no NAT)",
                    pod.name,
                    a.peer
                );
            }
        }
    }
    Ok(())
}

/// Row 4 across nodes: a pod on any node reaches every node's address on a slice port, and the
/// slice's pod on that node answers.
pub async fn pods_reach_slice_ports_on_every_node(ctx: &Ctx) -> anyhow::Result<()> {
    let game = ctx.range_of("game")?;
    let on = pod_by_node(ctx.pods_of("game")?);
    for client in ctx.pods_of("plain")? {
        for node in &ctx.nodes {
            let want = on
                .get(node.name.as_str())
                .context("a node without a game pod")?;
            let a = ctx
                .pod_dial(&client.name, "tcp", SocketAddrV4::new(node.ip, game.start))
                .await?;
            ensure!(
                a.name == want.name,
                "{} on {} dialled {}:{} and got {}, want {}",
                client.name,
                client.node,
                node.ip,
                game.start,
                a.name,
                want.name
            );
        }
    }
    Ok(())
}

/// Slice pods on different nodes reach each other through their node addresses, with no NAT:
/// the callee sees the caller's node address and a port of the caller's own slice.
pub async fn slice_pods_reach_each_other_across_nodes(ctx: &Ctx) -> anyhow::Result<()> {
    let game = ctx.range_of("game")?;
    let on = pod_by_node(ctx.pods_of("game")?);
    let callers: Vec<(&PodAt, &str)> = ctx
        .pods_of("game")?
        .iter()
        .map(|p| (p, "game"))
        .chain(ctx.pods_of("web")?.iter().map(|p| (p, "web")))
        .collect();
    for (caller, slice) in callers {
        let own = ctx.range_of(slice)?;
        for node in ctx.nodes.iter().filter(|n| n.name != caller.node) {
            let want = on
                .get(node.name.as_str())
                .context("a node without a game pod")?;
            for proto in ["tcp", "udp"] {
                let a = ctx
                    .pod_dial(
                        &caller.name,
                        proto,
                        SocketAddrV4::new(node.ip, game.start + 1),
                    )
                    .await?;
                ensure!(
                    a.name == want.name,
                    "{} -> {}: answered by {}",
                    caller.name,
                    node.name,
                    a.name
                );
                ensure!(
                    a.peer.ip() == caller.node_ip && own.contains(a.peer.port()),
                    "{} (slice {slice} on {}) reached {} from {}, want {} and a port of {own}",
                    caller.name,
                    caller.node,
                    want.name,
                    a.peer,
                    caller.node_ip
                );
            }
        }
    }
    Ok(())
}

/// Row 2: a slice pod's connections to the remote leave from its node's address and a port of
/// its own slice.
pub async fn pods_reach_remote(ctx: &Ctx) -> anyhow::Result<()> {
    let remote = SocketAddrV4::new(ctx.s.remote_ip, REMOTE_PORT);
    for slice in ["game", "web"] {
        let range = ctx.range_of(slice)?;
        for pod in ctx.pods_of(slice)? {
            for proto in ["tcp", "udp"] {
                let a = ctx.pod_dial(&pod.name, proto, remote).await?;
                ensure!(
                    a.peer.ip() == pod.node_ip,
                    "{} reached the remote over {proto} from {}, want its node's address {}",
                    pod.name,
                    a.peer,
                    pod.node_ip
                );
                ensure!(
                    range.contains(a.peer.port()),
                    "{} used source port {} over {proto}, outside its slice {range}",
                    pod.name,
                    a.peer.port()
                );
            }
        }
    }
    Ok(())
}

/// Row 3: slice pods resolve cluster names (and the remote's) through the cluster DNS.
pub async fn pods_resolve(ctx: &Ctx) -> anyhow::Result<()> {
    for pod in ctx.pods_of("game")?.iter().chain(ctx.pods_of("web")?) {
        let out = ctx
            .pod_exec(
                &pod.name,
                &["nslookup", "kubernetes.default.svc.cluster.local"],
            )
            .await?;
        ensure!(
            out.contains("Address") && !out.contains("can't find"),
            "{}: {out}",
            pod.name
        );
        if let Some(name) = &ctx.s.remote_name {
            let out = ctx.pod_exec(&pod.name, &["nslookup", name]).await?;
            ensure!(
                out.contains(&ctx.s.remote_ip.to_string()),
                "{} resolved {name} to: {out}",
                pod.name
            );
        }
    }
    Ok(())
}

/// Row 9: slice `game` may not send from slice `web`'s ports: nothing it sends from them reaches
/// the remote host (its log of callers proves it); and web's ports never reach game.
pub async fn foreign_ports_blocked(ctx: &Ctx, remote: &shell::Captured) -> anyhow::Result<()> {
    let game = &ctx.pods_of("game")?[0];
    let web = ctx.range_of("web")?;
    let remote_addr = SocketAddrV4::new(ctx.s.remote_ip, REMOTE_PORT).to_string();
    let foreign = SocketAddrV4::new(game.node_ip, web.start + 2).to_string();
    // Only what the remote logs from now on counts: web's own earlier calls may legitimately
    // have left from this very port (the kernel picks it from web's range).
    let logged_before = remote.lines().len();
    for proto in ["tcp", "udp"] {
        let r = ctx
            .pod_exec(
                &game.name,
                &[
                    "portslice-e2e-agent",
                    "dial",
                    proto,
                    &remote_addr,
                    "--bind",
                    &foreign,
                    "--timeout-ms",
                    "1500",
                ],
            )
            .await;
        ensure!(
            r.is_err(),
            "{} (slice game) reached the remote over {proto} from {foreign}, a port of slice web: {r:?}",
            game.name
        );
    }
    // Positive control: the same pod from its own ports is seen by the remote.
    let own = ctx
        .pod_dial(&game.name, "udp", remote_addr.parse::<SocketAddr>()?)
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = remote.lines().split_off(logged_before);
    ensure!(
        seen.iter().any(|l| l.ends_with(&own.peer.to_string())),
        "the remote's log misses {}'s own call from {}: {seen:?}",
        game.name,
        own.peer
    );
    let leaked: Vec<&String> = seen
        .iter()
        .filter(|l| l.ends_with(&format!(" {foreign}")))
        .collect();
    ensure!(
        leaked.is_empty(),
        "packets from {} with web's source {foreign} reached the remote: {leaked:?}",
        game.name
    );
    // And game's node address on web's ports reaches no game pod.
    if let Ok(a) = ctx
        .remote_dial("tcp", SocketAddrV4::new(game.node_ip, web.start))
        .await
    {
        ensure!(
            a.name != game.name,
            "web's port on {} answered by game's pod",
            game.node
        );
    }
    Ok(())
}

/// Row 7: a host process (here a hostNetwork pod, in the node's own network namespace) on a
/// port outside every slice gets the remote's traffic untouched, on every node.
pub async fn host_ports_stay_with_host(ctx: &Ctx) -> anyhow::Result<()> {
    let port = 39000 + (std::process::id() % 900) as u16;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let mut names = Vec::new();
    for node in &ctx.nodes {
        let name = format!("host-{}", node.name);
        pods.create(
            &PostParams::default(),
            &manifests::host_agent_pod(&name, &ctx.ns, &node.name, port, &ctx.s.agent_image)?,
        )
        .await?;
        names.push((name, node));
    }
    let result = async {
        for (name, node) in &names {
            let addr = SocketAddrV4::new(node.ip, port);
            let a = wait_until(
                &format!("the host agent on {addr}"),
                workloads::POD_READY,
                || async { Ok(ctx.remote_dial("tcp", addr).await.ok()) },
            )
            .await?;
            ensure!(
                &a.name == name,
                "{addr} answered by {}, want the host agent {name}",
                a.name
            );
            ensure!(
                a.peer.ip() == ctx.s.remote_ip,
                "the host saw the remote as {}",
                a.peer
            );
        }
        Ok(())
    }
    .await;
    for (name, _) in &names {
        let _ = pods.delete(name, &DeleteParams::default()).await;
    }
    result
}

/// The remote host's agent: answers on [`REMOTE_PORT`] and logs every caller.
pub fn start_remote_agent(ctx: &Ctx) -> anyhow::Result<shell::Captured> {
    let port = REMOTE_PORT.to_string();
    shell::spawn_captured(&shell::with_prefix(
        &ctx.s.remote_exec,
        &[
            &ctx.s.agent_bin.to_string_lossy(),
            "serve",
            "--tcp",
            &port,
            "--udp",
            &port,
        ],
    ))
}

/// The answer of a node's slice pod for `slice` on its first port, from the remote.
pub async fn remote_answer(
    ctx: &Ctx,
    node_ip: std::net::Ipv4Addr,
    slice: &str,
) -> anyhow::Result<probe::Answer> {
    let range = ctx.range_of(slice)?;
    ctx.remote_dial("tcp", SocketAddrV4::new(node_ip, range.start))
        .await
}

/// Row 1 on the nodes' IPv6 addresses (dual-stack clusters): the remote reaches every slice pod
/// on its node's IPv6 address, over TCP and UDP, with no NAT; the same pods answer as on IPv4.
pub async fn remote_reaches_ipv6(ctx: &Ctx, remote6: std::net::Ipv6Addr) -> anyhow::Result<()> {
    for proto in ["tcp", "udp"] {
        remote_reaches_on(ctx, proto, |p| p.node_ip6.map(Into::into), remote6.into()).await?;
    }
    Ok(())
}

/// Row 2 on IPv6: a slice pod's connections to the remote's IPv6 address leave from its node's
/// IPv6 address and a port of its own slice (`net.ipv4.ip_local_port_range` confines IPv6
/// sockets too).
pub async fn pods_reach_remote_ipv6(ctx: &Ctx, remote6: std::net::Ipv6Addr) -> anyhow::Result<()> {
    let remote = SocketAddrV6::new(remote6, REMOTE_PORT, 0, 0);
    for slice in ["game", "web"] {
        let range = ctx.range_of(slice)?;
        for pod in ctx.pods_of(slice)? {
            let ip6 = pod
                .node_ip6
                .with_context(|| format!("{} has no IPv6 address", pod.node))?;
            for proto in ["tcp", "udp"] {
                let a = ctx.pod_dial(&pod.name, proto, remote).await?;
                ensure!(
                    a.peer.ip() == ip6 && range.contains(a.peer.port()),
                    "{} reached the remote over {proto}/IPv6 from {}, want {ip6} and a port of {range}",
                    pod.name,
                    a.peer
                );
            }
        }
    }
    Ok(())
}
