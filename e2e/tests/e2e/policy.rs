//! Who may hold which ports, on a real cluster: tenant RBAC through the built-in roles (the
//! controller manager aggregates ours into them), the admission policies the chart ships, and a
//! node refusing a slice whose port a host process listens on.
use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use portslice_crds::{PortRange, PortSlice, SLICE_ANNOTATION};
use portslice_e2e::{manifests, shell};

use crate::ctx::{Ctx, SHORT, wait_until};
use crate::workloads;

/// A namespace admin (a ServiceAccount bound to the built-in `admin` role, nothing of ours)
/// creates a size slice; a reservation outside the policy is refused at admission, the node's
/// own ports too, and the slice's status stays the operator's.
pub async fn tenant_admin(ctx: &Ctx) -> anyhow::Result<()> {
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "tenant-admin"}}))?;
    sas.create(&PostParams::default(), &sa).await?;
    let rbs: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let rb: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tenant-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant-admin", "namespace": ctx.ns}]
    }))?;
    rbs.create(&PostParams::default(), &rb).await?;
    let who = format!("--as=system:serviceaccount:{}:tenant-admin", ctx.ns);
    // `extra` is e.g. `--subresource=status` (`portslices/status` would name a slice "status").
    let can = |verb: &'static str, what: &'static str, extra: &'static str| {
        let who = who.clone();
        async move {
            let mut args = vec!["-n", &ctx.ns, "auth", "can-i", verb, what, &who];
            if !extra.is_empty() {
                args.push(extra);
            }
            let out = shell::run(&ctx.kubectl(&args), None, SHORT).await?;
            Ok::<_, anyhow::Error>(out.stdout.trim() == "yes")
        }
    };
    // Aggregation is the controller manager's: give it a moment after install.
    wait_until(
        "the admin role to include PortSlices",
        Duration::from_secs(60),
        || async {
            Ok(can("create", "portslices.portslice.io", "")
                .await?
                .then_some(()))
        },
    )
    .await?;
    ensure!(
        !can("patch", "portslices.portslice.io", "--subresource=status").await?,
        "a tenant may not write slice status"
    );
    let apply = |name: &str, spec: &str| {
        let who = who.clone();
        let manifest = format!(
            "apiVersion: portslice.io/v1alpha1\nkind: PortSlice\nmetadata: {{name: {name}, namespace: {}}}\nspec: {spec}\n",
            ctx.ns
        );
        async move {
            shell::run(
                &ctx.kubectl(&["apply", &who, "-f", "-"]),
                Some(&manifest),
                SHORT,
            )
            .await
        }
    };
    let sized = apply("tenant-sized", "{size: 5}").await?;
    ensure!(
        sized.success(),
        "the namespace admin could not create a size slice: {}",
        sized.stderr
    );
    for (name, spec, says) in [
        (
            "tenant-elsewhere",
            "{ports: {start: 7000, end: 7001}}",
            "may not reserve",
        ),
        (
            "tenant-ssh",
            "{ports: {start: 22, end: 22}}",
            "node's own ports",
        ),
    ] {
        let out = apply(name, spec).await?;
        ensure!(
            !out.success() && out.stderr.contains(says),
            "{name}: exit {:?}: {}",
            out.code,
            out.stderr
        );
    }
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    workloads::wait_range(&api, "tenant-sized", SHORT).await?;
    api.delete("tenant-sized", &DeleteParams::default()).await?;
    Ok(())
}

/// Admission refuses changing or removing a running slice pod's annotation.
pub async fn annotation_is_fixed(ctx: &Ctx) -> anyhow::Result<()> {
    let pod = &ctx.pods_of("game")?[0];
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    for value in [serde_json::json!("web"), serde_json::Value::Null] {
        let patch = serde_json::json!({"metadata": {"annotations": {SLICE_ANNOTATION: value}}});
        match pods
            .patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains("cannot change") => {}
            other => bail!(
                "setting {}'s annotation to {value} was not refused: {other:?}",
                pod.name
            ),
        }
    }
    Ok(())
}

/// A host process (a hostNetwork pod) on a node listens on a port the policy lets a slice
/// reserve: that node refuses the slice's pod (its sandbox fails with the CNI plugin's reason)
/// and the host process keeps its traffic.
pub async fn host_listener_refuses(ctx: &Ctx) -> anyhow::Result<()> {
    let node = ctx
        .nodes
        .iter()
        .find(|n| !n.control_plane)
        .context("no worker")?
        .clone();
    let port = 59990;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    pods.create(
        &PostParams::default(),
        &manifests::host_agent_pod("listener", &ctx.ns, &node.name, port, &ctx.s.agent_image)?,
    )
    .await?;
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    api.create(
        &PostParams::default(),
        &manifests::slice_of_ports(
            "hosted",
            &ctx.ns,
            PortRange {
                start: port,
                end: port,
            },
        ),
    )
    .await?;
    workloads::wait_range(&api, "hosted", SHORT).await?;
    let addr = SocketAddrV4::new(node.ip, port);
    wait_until(
        &format!("the host listener on {addr}"),
        workloads::POD_READY,
        || async {
            Ok(ctx
                .remote_dial("tcp", addr)
                .await
                .ok()
                .filter(|a| a.name == "listener"))
        },
    )
    .await?;
    let mut member = manifests::host_agent_pod(
        "hosted-member",
        &ctx.ns,
        &node.name,
        port,
        &ctx.s.agent_image,
    )?;
    if let Some(spec) = member.spec.as_mut() {
        spec.host_network = None;
    }
    member.metadata.annotations =
        Some([(SLICE_ANNOTATION.to_string(), "hosted".to_string())].into());
    pods.create(&PostParams::default(), &member).await?;
    let events = wait_until(
        "the sandbox failure naming the listener",
        Duration::from_secs(90),
        || async {
            let out = shell::run_ok(
                &ctx.kubectl(&[
                    "-n",
                    &ctx.ns,
                    "get",
                    "events",
                    "--field-selector",
                    "involvedObject.name=hosted-member",
                    "-o",
                    "jsonpath={.items[*].message}",
                ]),
                SHORT,
            )
            .await?;
            Ok(out
                .contains(&format!("listens on TCP/{port}"))
                .then_some(out))
        },
    )
    .await?;
    ensure!(events.contains("hosted"), "{events}");
    let a = ctx.remote_dial("tcp", addr).await?;
    ensure!(
        a.name == "listener",
        "{addr} answered by {}, want the host listener",
        a.name
    );
    // The slice's owner sees it on the PortSlice: which node refuses, and why.
    let refusal = wait_until(
        "the node's refusal in the PortSlice's status",
        Duration::from_secs(60),
        || async {
            let status = api.get("hosted").await?.status.unwrap_or_default();
            Ok(status
                .node_refusals
                .into_iter()
                .find(|r| r.node == node.name))
        },
    )
    .await?;
    ensure!(
        refusal.reason == "HostPortInUse" && refusal.message.contains(&format!("TCP/{port}")),
        "{refusal:?}"
    );
    for name in ["hosted-member", "listener"] {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    api.delete("hosted", &DeleteParams::default()).await?;
    Ok(())
}

/// `spec.allowedSources` on the real cluster: a slice open only to TEST-NET-2 refuses the
/// remote; listing the remote lets it in within moments (the node daemon's PortSlice watch,
/// with the chart's node rights); taking it out again shuts it out.
pub async fn allowed_sources_follow_edits(ctx: &Ctx) -> anyhow::Result<()> {
    let elsewhere = "198.51.100.0/24";
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let mut slice = manifests::slice_of_size("guarded", &ctx.ns, 4);
    slice.spec.allowed_sources = vec![elsewhere.into()];
    api.create(&PostParams::default(), &slice).await?;
    let range = workloads::wait_range(&api, "guarded", SHORT).await?;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(ctx.client.clone(), &ctx.ns);
    deployments
        .create(
            &PostParams::default(),
            &manifests::agent_deployment("guarded", &ctx.ns, "guarded", &ctx.s.agent_image, None)?,
        )
        .await?;
    let pod = workloads::ready_pods(ctx, "guarded", 1)
        .await?
        .into_iter()
        .next()
        .context("no guarded pod")?;
    let addr = SocketAddrV4::new(pod.node_ip, range.start);
    let reaches = || async {
        ctx.remote_dial("tcp", addr)
            .await
            .is_ok_and(|a| a.name == pod.name)
    };
    ensure!(
        !reaches().await,
        "{addr} answered a source outside allowedSources"
    );
    let set = |list: Vec<String>| {
        let api = api.clone();
        async move {
            let patch = serde_json::json!({"spec": {"allowedSources": list}});
            api.patch("guarded", &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    set(vec![elsewhere.into(), format!("{}/32", ctx.s.remote_ip)]).await?;
    wait_until("the node to let the listed remote in", SHORT, || async {
        Ok(reaches().await.then_some(()))
    })
    .await?;
    set(vec![elsewhere.into()]).await?;
    wait_until("the node to shut the remote out again", SHORT, || async {
        Ok((!reaches().await).then_some(()))
    })
    .await?;
    deployments
        .delete("guarded", &DeleteParams::default())
        .await?;
    api.delete("guarded", &DeleteParams::default()).await?;
    Ok(())
}
