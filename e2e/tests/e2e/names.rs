//! Apps that know their ports, on the real cluster: Debian's coturn from examples/40-coturn.yaml,
//! configured only from the slice's ConfigMap, found through the cluster's real CoreDNS (A and
//! SRV, from a pod and from the remote host), serving a real TURN client on the remote host; and
//! the records following the slivers.
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use portslice_crds::PortSlice;
use portslice_e2e::shell::{self, with_prefix};

use crate::ctx::{Ctx, SHORT, wait_until};
use crate::workloads;

/// The suite's NodePort to the cluster DNS, for the remote host.
const DNS_SERVICE: &str = "portslice-e2e-dns";

/// The coturn example in the suite's namespace, with the suite's image.
pub async fn apply_coturn(ctx: &Ctx) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(ctx.s.examples.join("40-coturn.yaml"))
        .context("reading examples/40-coturn.yaml")?
        .replace(
            "namespace: portslice-demo",
            &format!("namespace: {}", ctx.ns),
        )
        .replace("localhost/portslice-coturn:dev", &ctx.s.coturn_image);
    for doc in text.split("\n---") {
        let value: serde_json::Value = serde_yaml::from_str(doc)?;
        match value["kind"].as_str() {
            Some("PortSlice") => {
                let s: PortSlice = serde_json::from_value(value)?;
                Api::<PortSlice>::namespaced(ctx.client.clone(), &ctx.ns)
                    .create(&PostParams::default(), &s)
                    .await?;
            }
            Some("Deployment") => {
                let d: Deployment = serde_json::from_value(value)?;
                Api::<Deployment>::namespaced(ctx.client.clone(), &ctx.ns)
                    .create(&PostParams::default(), &d)
                    .await?;
            }
            other => bail!("unexpected {other:?} in examples/40-coturn.yaml"),
        }
    }
    Ok(())
}

fn fqdn(ctx: &Ctx, name: &str) -> String {
    format!("{name}.{}.svc.cluster.local", ctx.ns)
}

/// `portslice-e2e-agent dns` in a pod of the suite.
async fn dns_in_pod(ctx: &Ctx, name: &str, rtype: &str) -> anyhow::Result<Vec<String>> {
    let pod = &ctx.pods_of("plain")?[0];
    let out = ctx
        .pod_exec(&pod.name, &["portslice-e2e-agent", "dns", name, rtype])
        .await?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The same from the remote host, through the NodePort to the cluster DNS on `node_ip`.
async fn dns_from_remote(
    ctx: &Ctx,
    server: (Ipv4Addr, u16),
    name: &str,
    rtype: &str,
) -> anyhow::Result<Vec<String>> {
    let agent = ctx.s.agent_bin.to_string_lossy().into_owned();
    let server = format!("{}:{}", server.0, server.1);
    let out = shell::run_ok(
        &with_prefix(
            &ctx.s.remote_exec,
            &[&agent, "dns", name, rtype, "--server", &server],
        ),
        SHORT,
    )
    .await?;
    Ok(out.lines().map(str::to_string).collect())
}

/// `SRV <prio> <weight> <port> <target>` → the port.
fn srv_port(line: &str) -> Option<u16> {
    line.strip_prefix("SRV ")?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// A NodePort Service to the cluster DNS (the remote host has no route to Service IPs).
async fn dns_node_port(ctx: &Ctx) -> anyhow::Result<u16> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), "kube-system");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": DNS_SERVICE, "labels": {"portslice.io/e2e": "true"}},
        "spec": {"type": "NodePort", "selector": {"k8s-app": "kube-dns"},
                 "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53}]}
    }))?;
    let svc = match api.create(&PostParams::default(), &svc).await {
        Ok(s) => s,
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(DNS_SERVICE).await?,
        Err(e) => return Err(e.into()),
    };
    svc.spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().and_then(|p| p.node_port))
        .and_then(|p| u16::try_from(p).ok())
        .context("the DNS NodePort")
}

/// coturn learns its ports from the ConfigMap alone; the remote host finds it by SRV and A
/// records, through the cluster's CoreDNS, and relays real TURN traffic through it.
pub async fn coturn_found_by_srv(ctx: &Ctx) -> anyhow::Result<()> {
    apply_coturn(ctx).await?;
    let slices: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    workloads::wait_range(&slices, "turn", SHORT).await?;
    let pod = workloads::ready_pods(ctx, "turn", 1)
        .await?
        .into_iter()
        .next()
        .context("no turn pod")?;
    let want_port = slices
        .get("turn")
        .await?
        .status
        .and_then(|s| s.named_ports.into_iter().find(|n| n.name == "turn"))
        .context("the named port turn in the status")?
        .port;

    // From a pod: the cluster DNS answers A with the node address and SRV with the real port.
    let srv_name = fqdn(ctx, "_turn._udp.turn");
    let srv = wait_until("SRV _turn._udp.turn from a pod", SHORT, || async {
        let lines = dns_in_pod(ctx, &srv_name, "SRV").await.unwrap_or_default();
        Ok((!lines.is_empty()).then_some(lines))
    })
    .await?;
    ensure!(
        srv.iter().any(|l| srv_port(l) == Some(want_port)),
        "SRV answers {srv:?}, want port {want_port}"
    );
    let a = dns_in_pod(ctx, &fqdn(ctx, "turn"), "A").await?;
    ensure!(
        a == [format!("A {}", pod.node_ip)],
        "A answers {a:?}, want the node address {}",
        pod.node_ip
    );

    // From the remote host, through a NodePort: all it knows is the name.
    let port = dns_node_port(ctx).await?;
    let dns = (ctx.nodes[0].ip, port);
    let srv = wait_until("SRV from the remote host", SHORT, || async {
        let lines = dns_from_remote(ctx, dns, &srv_name, "SRV")
            .await
            .unwrap_or_default();
        Ok((!lines.is_empty()).then_some(lines))
    })
    .await?;
    let turn_port = srv
        .iter()
        .find_map(|l| srv_port(l))
        .context("an SRV port")?;
    let a = dns_from_remote(ctx, dns, &fqdn(ctx, "turn"), "A").await?;
    let turn_ip = a
        .first()
        .and_then(|l| l.strip_prefix("A "))
        .context("an A record")?
        .to_string();

    // A real TURN client: allocations, channel binds and relayed data, client to client.
    let out = shell::run(
        &with_prefix(
            &ctx.s.remote_exec,
            &[
                "turnutils_uclient",
                "-y",
                "-u",
                "demo",
                "-w",
                "demo",
                "-p",
                &turn_port.to_string(),
                "-n",
                "5",
                "-m",
                "1",
                &turn_ip,
            ],
        ),
        None,
        Duration::from_secs(60),
    )
    .await?;
    let text = format!("{}{}", out.stdout, out.stderr);
    let received = text
        .lines()
        .filter_map(|l| l.split("tot_recv_msgs=").nth(1))
        .filter_map(|r| {
            r.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    ensure!(
        received > 0 && text.contains("Total lost packets 0 "),
        "turnutils_uclient relayed {received} messages through {turn_ip}:{turn_port}: {}",
        text.lines().rev().take(8).collect::<Vec<_>>().join(" | ")
    );
    Ok(())
}

/// A and SRV answers follow the slivers: a second relay pod on another node adds its node
/// address, scaling back removes it.
pub async fn records_follow_slivers(ctx: &Ctx) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let spread = serde_json::json!({"spec": {"replicas": 2, "template": {"spec": {"affinity": {
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"app": "turn"}}
        }]}
    }}}}});
    deployments
        .patch("turn", &PatchParams::default(), &Patch::Merge(&spread))
        .await?;
    let pods = workloads::ready_pods(ctx, "turn", 2).await?;
    let mut want: Vec<String> = pods.iter().map(|p| format!("A {}", p.node_ip)).collect();
    want.sort();
    let name = fqdn(ctx, "turn");
    wait_until("two A records", SHORT, || async {
        let mut a = dns_in_pod(ctx, &name, "A").await.unwrap_or_default();
        a.sort();
        Ok((a == want).then_some(()))
    })
    .await?;
    deployments
        .patch(
            "turn",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
        )
        .await?;
    wait_until("one A record again", Duration::from_secs(60), || async {
        let a = dns_in_pod(ctx, &name, "A").await.unwrap_or_default();
        Ok((a.len() == 1).then_some(()))
    })
    .await?;
    // Clean up what this module made outside the suite's namespace.
    let _ = Api::<Service>::namespaced(ctx.client.clone(), "kube-system")
        .delete(DNS_SERVICE, &DeleteParams::default())
        .await;
    Ok(())
}

/// On a dual-stack cluster the slice's name answers AAAA too: the IPv6 address of the node its
/// sliver runs on (the operator's `<slice>-ipv6` EndpointSlice).
pub async fn aaaa_names_the_slivers_ipv6_address(ctx: &Ctx) -> anyhow::Result<()> {
    let pod = workloads::ready_pods(ctx, "turn", 1)
        .await?
        .into_iter()
        .next()
        .context("no turn pod")?;
    let want = pod
        .node_ip6
        .context("the turn pod's node has no IPv6 address")?;
    let name = fqdn(ctx, "turn");
    let got = wait_until("AAAA of the turn slice", SHORT, || async {
        let lines = dns_in_pod(ctx, &name, "AAAA").await.unwrap_or_default();
        Ok((!lines.is_empty()).then_some(lines))
    })
    .await?;
    ensure!(
        got == [format!("AAAA {want}")],
        "AAAA answers {got:?}, want the node's IPv6 address {want}"
    );
    Ok(())
}
