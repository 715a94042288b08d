//! The PortSlice end-to-end scenario, as a user lives it: `helm install`; apply PortSlices; run a
//! DaemonSet and a Deployment annotated into slices; probe them from the remote host; upgrade;
//! delete a slice; `helm uninstall`; check the node is clean.
//!
//! Runs against the current kubeconfig (`KUBECONFIG`), only when `PORTSLICE_E2E=1`
//! (`e2e/scripts/test-e2e.sh` and `e2e/scripts/kind.sh` set it; settings in
//! `portslice_e2e::settings`). Each check is named and reported; `PORTSLICE_E2E_SKIP=a,b` skips
//! checks by name, loudly. Everything the suite creates is removed at the end, pass or fail.
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use portslice_crds::{PortRange, PortSlice};
use portslice_e2e::manifests::{self, E2E_LABEL};
use portslice_e2e::probe::{self, Answer};
use portslice_e2e::report::Report;
use portslice_e2e::settings::Settings;
use portslice_e2e::shell::{self, with_prefix};

const REMOTE_PORT: u16 = 9000;
const SHORT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(300);

struct Ctx {
    s: Settings,
    client: Client,
    ns: String,
    /// The host's ip_local_reserved_ports before install, to compare after uninstall.
    reserved_before: Option<String>,
}

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
    let ns = format!("portslice-e2e-{}", std::process::id());
    let mut ctx = Ctx {
        s,
        client,
        ns,
        reserved_before: None,
    };
    let mut r = Report::new(&std::env::var("PORTSLICE_E2E_SKIP").unwrap_or_default());

    // The node's state before install is what uninstall must restore: start from no release.
    let rel = [
        ctx.s.release.as_str(),
        "-n",
        ctx.s.release_namespace.as_str(),
    ];
    if shell::run(&helm(&ctx, &[&["status"][..], &rel].concat()), None, SHORT)
        .await?
        .success()
    {
        eprintln!(
            "[e2e] release {} exists: uninstalling it first",
            ctx.s.release
        );
        shell::run_ok(
            &helm(&ctx, &[&["uninstall", "--wait"][..], &rel].concat()),
            LONG,
        )
        .await?;
    }
    release_namespace_gone(&ctx).await?;
    ctx.reserved_before = node_cat(&ctx, "/proc/sys/net/ipv4/ip_local_reserved_ports")
        .await
        .ok();
    let installed = r.check("helm-install", || helm_install(&ctx)).await;
    scenario(&mut ctx, &mut r, installed).await;

    // Workloads go before the chart: their CNI DEL must still find the plugin in the chain.
    let cleaned = cleanup_namespace(&ctx).await;
    if let Err(e) = &cleaned {
        eprintln!("[e2e] warning: cleaning up namespace {}: {e:#}", ctx.ns);
    }
    let rel = [
        ctx.s.release.as_str(),
        "-n",
        ctx.s.release_namespace.as_str(),
    ];
    if shell::run(&helm(&ctx, &[&["status"][..], &rel].concat()), None, SHORT)
        .await?
        .success()
    {
        r.check("helm-uninstall-leaves-node-clean", || {
            helm_uninstall_clean(&ctx)
        })
        .await;
    } else {
        r.not_run(
            "helm-uninstall-leaves-node-clean",
            "no release to uninstall",
        );
    }
    eprintln!("{}", r.summary());
    Ok(r.failed() == 0)
}

/// Everything between install and uninstall; returns early (recording what was not run) when
/// a prerequisite fails.
async fn scenario(ctx: &mut Ctx, r: &mut Report, installed: bool) {
    const AFTER_INSTALL: [&str; 13] = [
        "operator-holds-leader-lease",
        "node-daemon-joins-cni-chain",
        "slices-get-disjoint-ranges",
        "slice-pods-run",
        "kubectl-get-portslices-shows-ranges-and-slivers",
        "remote-reaches-slice-pods-tcp",
        "remote-reaches-slice-pods-udp",
        "slice-pods-reach-remote-from-own-ports",
        "slice-pods-resolve-cluster-dns",
        "slice-pods-cannot-use-foreign-ports",
        "host-ports-outside-slices-stay-with-host",
        "helm-upgrade-keeps-slices-serving",
        "deleted-slice-keeps-range-until-pods-gone",
    ];
    if !installed {
        for c in AFTER_INSTALL {
            r.not_run(c, "helm-install failed");
        }
        return;
    }
    r.check("operator-holds-leader-lease", || leader_lease(ctx))
        .await;
    r.check("node-daemon-joins-cni-chain", || cni_chain_has_plugin(ctx))
        .await;
    let mut slices = BTreeMap::new();
    let ok = r
        .check("slices-get-disjoint-ranges", || async {
            slices = create_slices(ctx).await?;
            Ok(())
        })
        .await;
    if !ok {
        for c in &AFTER_INSTALL[3..] {
            r.not_run(c, "slices-get-disjoint-ranges failed");
        }
        return;
    }
    let mut pods = BTreeMap::new();
    let ok = r
        .check("slice-pods-run", || async {
            pods = create_workloads(ctx).await?;
            Ok(())
        })
        .await;
    if !ok {
        for c in &AFTER_INSTALL[4..] {
            r.not_run(c, "slice-pods-run failed");
        }
        return;
    }
    r.check("kubectl-get-portslices-shows-ranges-and-slivers", || {
        get_portslices(ctx, &slices)
    })
    .await;

    let remote = shell::spawn_captured(&with_prefix(
        &ctx.s.remote_exec,
        &[
            &ctx.s.agent_bin.to_string_lossy(),
            "serve",
            "--tcp",
            &REMOTE_PORT.to_string(),
            "--udp",
            &REMOTE_PORT.to_string(),
        ],
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.check("remote-reaches-slice-pods-tcp", || {
        remote_reaches(ctx, &slices, &pods, "tcp")
    })
    .await;
    r.check("remote-reaches-slice-pods-udp", || {
        remote_reaches(ctx, &slices, &pods, "udp")
    })
    .await;
    match &remote {
        Ok(_) => {
            r.check("slice-pods-reach-remote-from-own-ports", || {
                pods_reach_remote(ctx, &slices, &pods)
            })
            .await;
        }
        Err(e) => r.not_run(
            "slice-pods-reach-remote-from-own-ports",
            &format!("remote agent did not start: {e:#}"),
        ),
    }
    r.check("slice-pods-resolve-cluster-dns", || {
        pods_resolve(ctx, &pods)
    })
    .await;
    match &remote {
        Ok(agent) => {
            r.check("slice-pods-cannot-use-foreign-ports", || {
                foreign_ports_blocked(ctx, &slices, &pods, agent)
            })
            .await;
        }
        Err(e) => r.not_run(
            "slice-pods-cannot-use-foreign-ports",
            &format!("remote agent did not start: {e:#}"),
        ),
    }
    if ctx.s.node_exec.is_empty() {
        r.check("host-ports-outside-slices-stay-with-host", || {
            host_port_passthrough(ctx)
        })
        .await;
    } else {
        r.not_run(
            "host-ports-outside-slices-stay-with-host",
            "needs the suite to run on the node",
        );
    }
    r.check("helm-upgrade-keeps-slices-serving", || {
        helm_upgrade(ctx, &slices, &pods)
    })
    .await;
    drop(remote);
    r.check("deleted-slice-keeps-range-until-pods-gone", || {
        deleted_slice_keeps_range(ctx, &slices)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// helpers

async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(format!("{e:#}")),
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last.map(|l| format!(" (last error: {l})"))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn helm(ctx: &Ctx, args: &[&str]) -> Vec<String> {
    let mut v = vec![ctx.s.helm.to_string_lossy().into_owned()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn kubectl(ctx: &Ctx, args: &[&str]) -> Vec<String> {
    let mut v = vec![ctx.s.kubectl.to_string_lossy().into_owned()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

async fn node_cat(ctx: &Ctx, path: &str) -> anyhow::Result<String> {
    shell::run_ok(&with_prefix(&ctx.s.node_exec, &["cat", path]), SHORT).await
}

async fn node_exists(ctx: &Ctx, path: &str) -> anyhow::Result<bool> {
    Ok(shell::run(
        &with_prefix(&ctx.s.node_exec, &["test", "-e", path]),
        None,
        SHORT,
    )
    .await?
    .success())
}

/// `kubectl exec` the agent (or another program) in a pod; Ok(output) only on exit 0.
async fn pod_exec(ctx: &Ctx, pod: &str, argv: &[&str]) -> anyhow::Result<String> {
    let mut a = vec!["-n", ctx.ns.as_str(), "exec", pod, "--"];
    a.extend_from_slice(argv);
    shell::run_ok(&kubectl(ctx, &a), SHORT).await
}

async fn remote_dial(ctx: &Ctx, proto: &str, addr: SocketAddrV4) -> anyhow::Result<Answer> {
    let agent = ctx.s.agent_bin.to_string_lossy().into_owned();
    let out = shell::run_ok(
        &with_prefix(
            &ctx.s.remote_exec,
            &[&agent, "dial", proto, &addr.to_string()],
        ),
        SHORT,
    )
    .await?;
    Ok(probe::parse_answer(&out)?)
}

fn range_of(slices: &BTreeMap<String, PortRange>, name: &str) -> anyhow::Result<PortRange> {
    slices
        .get(name)
        .copied()
        .ok_or_else(|| anyhow!("no range for slice {name}"))
}

fn pod_of<'a>(pods: &'a BTreeMap<String, String>, slice: &str) -> anyhow::Result<&'a str> {
    pods.get(slice)
        .map(String::as_str)
        .ok_or_else(|| anyhow!("no pod for slice {slice}"))
}

// ---------------------------------------------------------------------------------------------
// install / upgrade / uninstall

async fn helm_install(ctx: &Ctx) -> anyhow::Result<()> {
    let s = &ctx.s;
    let chart = s.chart.to_string_lossy().into_owned();
    let uplink = format!("node.uplink={}", s.uplink);
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
        "--set",
        &uplink,
        // Short quarantine and retry so the slice-deletion check finishes in seconds.
        "--set",
        "operator.quarantine=3s",
        "--set",
        "operator.extraArgs={--retry-interval=2s}",
    ];
    for set in &s.helm_sets {
        args.extend(["--set", set.as_str()]);
    }
    shell::run_ok(&helm(ctx, &args), LONG).await?;
    // helm --wait accepts a DaemonSet with maxUnavailable pods not ready: wait for all of them.
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), &s.release_namespace);
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &s.release_namespace);
    wait_until(
        "2 available operator replicas",
        Duration::from_secs(120),
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
    wait_until(
        "the node DaemonSet ready on every node",
        Duration::from_secs(120),
        || async {
            let list = dss
                .list(&ListParams::default().labels("app.kubernetes.io/component=node"))
                .await?;
            let ds = list.items.first().context("no node DaemonSet")?;
            let st = ds.status.clone().context("node DaemonSet has no status")?;
            let done = st.desired_number_scheduled > 0
                && st.number_ready == st.desired_number_scheduled
                && st.updated_number_scheduled == Some(st.desired_number_scheduled);
            Ok(done.then_some(()))
        },
    )
    .await
}

async fn leader_lease(ctx: &Ctx) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.s.release_namespace);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.s.release_namespace);
    let names: Vec<String> = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    wait_until(
        "an operator pod to hold the leader Lease",
        SHORT,
        || async {
            let all = leases.list(&ListParams::default()).await?;
            Ok(all.items.into_iter().find_map(|l| {
                let holder = l.spec?.holder_identity?;
                names.contains(&holder).then_some(())
            }))
        },
    )
    .await
}

async fn cni_chain_has_plugin(ctx: &Ctx) -> anyhow::Result<()> {
    wait_until(
        "the portslice plugin in the node's conflist",
        SHORT,
        || async {
            let conflist = first_conflist(ctx).await?;
            let text = node_cat(ctx, &conflist).await?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parsing {conflist}"))?;
            let types: Vec<&str> = v["plugins"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p["type"].as_str()).collect())
                .unwrap_or_default();
            Ok((types.last() == Some(&"portslice")).then_some(()))
        },
    )
    .await?;
    ensure!(
        node_exists(ctx, &format!("{}/portslice", ctx.s.cni_bin_dir)).await?,
        "plugin binary missing from the CNI bin dir"
    );
    ensure!(
        node_exists(ctx, &ctx.s.pin_root).await?,
        "no BPF pins under {}",
        ctx.s.pin_root
    );
    Ok(())
}

/// The file libcni (and containerd with max_conf_num 1) loads: the first by name.
async fn first_conflist(ctx: &Ctx) -> anyhow::Result<String> {
    let out = shell::run_ok(
        &with_prefix(&ctx.s.node_exec, &["ls", &ctx.s.cni_conf_dir]),
        SHORT,
    )
    .await?;
    let mut names: Vec<&str> = out
        .lines()
        .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf"))
        .collect();
    names.sort();
    let first = names.first().context("no CNI config on the node")?;
    Ok(format!("{}/{first}", ctx.s.cni_conf_dir))
}

async fn helm_upgrade(
    ctx: &Ctx,
    slices: &BTreeMap<String, PortRange>,
    pods: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let s = &ctx.s;
    let chart = s.chart.to_string_lossy().into_owned();
    shell::run_ok(
        &helm(
            ctx,
            &[
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
            ],
        ),
        LONG,
    )
    .await?;
    // The node daemon restarted; the pinned datapath must have kept serving the slices.
    remote_reaches(ctx, slices, pods, "tcp").await
}

async fn helm_uninstall_clean(ctx: &Ctx) -> anyhow::Result<()> {
    let s = &ctx.s;
    shell::run_ok(
        &helm(
            ctx,
            &[
                "uninstall",
                &s.release,
                "-n",
                &s.release_namespace,
                "--wait",
                "--timeout",
                "3m",
            ],
        ),
        LONG,
    )
    .await?;
    let mut dirty = Vec::new();
    if let Ok(conflist) = first_conflist(ctx).await {
        let text = node_cat(ctx, &conflist).await?;
        if text.contains("\"portslice\"") {
            dirty.push(format!("{conflist} still lists the portslice plugin"));
        }
    }
    for path in [
        format!("{}/portslice", s.cni_bin_dir),
        s.pin_root.clone(),
        format!("{}/portslice.kubeconfig", s.cni_conf_dir),
    ] {
        if node_exists(ctx, &path).await? {
            dirty.push(format!("{path} is still there"));
        }
    }
    let reserved = node_cat(ctx, "/proc/sys/net/ipv4/ip_local_reserved_ports")
        .await
        .ok();
    if reserved != ctx.reserved_before {
        dirty.push(format!(
            "ip_local_reserved_ports is {reserved:?}, was {:?} before install",
            ctx.reserved_before
        ));
    }
    release_namespace_gone(ctx).await?;
    ensure!(
        dirty.is_empty(),
        "node not clean after helm uninstall: {}",
        dirty.join("; ")
    );
    Ok(())
}

/// Deletes the release namespace and waits until it is gone, so the next install starts clean.
async fn release_namespace_gone(ctx: &Ctx) -> anyhow::Result<()> {
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

// ---------------------------------------------------------------------------------------------
// slices and workloads

async fn create_slices(ctx: &Ctx) -> anyhow::Result<BTreeMap<String, PortRange>> {
    let nss: Api<Namespace> = Api::all(ctx.client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ctx.ns, "labels": {E2E_LABEL: "true"}}
    }))?;
    nss.create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {}", ctx.ns))?;
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    for (name, size) in [("game", 10), ("web", 20)] {
        api.create(
            &PostParams::default(),
            &manifests::slice_of_size(name, &ctx.ns, size),
        )
        .await?;
    }
    let mut ranges = BTreeMap::new();
    for (name, size) in [("game", 10u32), ("web", 20)] {
        let range = wait_range(&api, name, SHORT).await?;
        ensure!(
            range.len() == size,
            "slice {name} got {range}, want {size} ports"
        );
        ensure!(range.start >= 1024, "slice {name} got {range}, below 1024");
        ranges.insert(name.to_string(), range);
    }
    let (a, b) = (ranges["game"], ranges["web"]);
    ensure!(
        a.end < b.start || b.end < a.start,
        "ranges overlap: game {a}, web {b}"
    );
    Ok(ranges)
}

async fn wait_range(
    api: &Api<PortSlice>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<PortRange> {
    wait_until(&format!("slice {name} to get a range"), timeout, || async {
        Ok(api.get(name).await?.status.and_then(|s| s.range))
    })
    .await
}

/// Slice "game" runs as a DaemonSet, slice "web" as a Deployment; returns slice -> pod name.
async fn create_workloads(ctx: &Ctx) -> anyhow::Result<BTreeMap<String, String>> {
    let img = &ctx.s.agent_image;
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    dss.create(
        &PostParams::default(),
        &manifests::agent_daemonset("game", &ctx.ns, "game", img)?,
    )
    .await?;
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    deps.create(
        &PostParams::default(),
        &manifests::agent_deployment("web", &ctx.ns, "web", img)?,
    )
    .await?;
    let mut pods = BTreeMap::new();
    for app in ["game", "web"] {
        pods.insert(
            app.to_string(),
            ready_pod(ctx, app, Duration::from_secs(120)).await?,
        );
    }
    Ok(pods)
}

async fn ready_pod(ctx: &Ctx, app: &str, timeout: Duration) -> anyhow::Result<String> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let lp = ListParams::default().labels(&format!("app={app}"));
    let res = wait_until(&format!("a Ready pod of {app}"), timeout, || async {
        let list = api.list(&lp).await?;
        Ok(list.items.into_iter().find_map(|p| {
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready { p.metadata.name } else { None }
        }))
    })
    .await;
    if res.is_err() {
        // Say why: the CNI plugin's refusal or the image problem is in the pod's events.
        let out = shell::run(
            &kubectl(
                ctx,
                &[
                    "-n",
                    &ctx.ns,
                    "describe",
                    "pods",
                    "-l",
                    &format!("app={app}"),
                ],
            ),
            None,
            SHORT,
        )
        .await;
        if let Ok(o) = out {
            let tail: Vec<&str> = o.stdout.lines().rev().take(8).collect();
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

async fn get_portslices(ctx: &Ctx, slices: &BTreeMap<String, PortRange>) -> anyhow::Result<()> {
    let api: Api<PortSlice> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    for name in slices.keys() {
        wait_until(
            &format!("slice {name} to report one sliver"),
            SHORT,
            || async {
                Ok(api
                    .get(name)
                    .await?
                    .status
                    .filter(|s| s.sliver_count == 1 && s.slivers.len() == 1)
                    .map(|_| ()))
            },
        )
        .await?;
    }
    let out = shell::run_ok(&kubectl(ctx, &["-n", &ctx.ns, "get", "portslices"]), SHORT).await?;
    let rows = probe::parse_get_portslices(&out);
    for (name, range) in slices {
        let row = rows
            .iter()
            .find(|(n, _, _)| n == name)
            .with_context(|| format!("no row for {name} in:\n{out}"))?;
        ensure!(
            row.1 == range.to_string() && row.2 == "1",
            "row for {name} is {row:?}, want range {range} and 1 sliver:\n{out}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// traffic

/// From the remote host, node-IP:first port of each slice answers with that slice's pod.
async fn remote_reaches(
    ctx: &Ctx,
    slices: &BTreeMap<String, PortRange>,
    pods: &BTreeMap<String, String>,
    proto: &str,
) -> anyhow::Result<()> {
    for (slice, range) in slices {
        let want = pod_of(pods, slice)?;
        for port in [range.start, range.start + 1] {
            let addr = SocketAddrV4::new(ctx.s.node_ip, port);
            let a = remote_dial(ctx, proto, addr)
                .await
                .with_context(|| format!("{proto} {addr} (slice {slice})"))?;
            ensure!(
                a.name == want,
                "{proto} {addr} answered by {}, want {want} of slice {slice}",
                a.name
            );
            ensure!(
                a.peer.ip() == &ctx.s.remote_ip,
                "{want} saw the remote as {}, want {} (no NAT)",
                a.peer,
                ctx.s.remote_ip
            );
        }
    }
    Ok(())
}

/// A slice pod's connections to the remote leave from node-IP and a port of its own slice.
async fn pods_reach_remote(
    ctx: &Ctx,
    slices: &BTreeMap<String, PortRange>,
    pods: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let remote = SocketAddrV4::new(ctx.s.remote_ip, REMOTE_PORT).to_string();
    for (slice, range) in slices {
        let pod = pod_of(pods, slice)?;
        for proto in ["tcp", "udp"] {
            let out = pod_exec(ctx, pod, &["portslice-e2e-agent", "dial", proto, &remote]).await?;
            let a = probe::parse_answer(&out)?;
            ensure!(
                a.peer.ip() == &ctx.s.node_ip,
                "{pod} reached the remote over {proto} from {}, want the node address {}",
                a.peer,
                ctx.s.node_ip
            );
            ensure!(
                range.contains(a.peer.port()),
                "{pod} used source port {} over {proto}, outside its slice {range}",
                a.peer.port()
            );
        }
    }
    Ok(())
}

async fn pods_resolve(ctx: &Ctx, pods: &BTreeMap<String, String>) -> anyhow::Result<()> {
    for pod in pods.values() {
        let out = pod_exec(
            ctx,
            pod,
            &["nslookup", "kubernetes.default.svc.cluster.local"],
        )
        .await?;
        ensure!(
            out.contains("Address") && !out.contains("can't find"),
            "{pod}: {out}"
        );
        if let Some(name) = &ctx.s.remote_name {
            let out = pod_exec(ctx, pod, &["nslookup", name]).await?;
            ensure!(
                out.contains(&ctx.s.remote_ip.to_string()),
                "{pod} resolved {name} to: {out}"
            );
        }
    }
    Ok(())
}

/// Slice "game" may not send from slice "web"'s ports: nothing it sends from them reaches the
/// remote host (its log of callers proves it); and web's ports never reach game.
async fn foreign_ports_blocked(
    ctx: &Ctx,
    slices: &BTreeMap<String, PortRange>,
    pods: &BTreeMap<String, String>,
    remote: &shell::Captured,
) -> anyhow::Result<()> {
    let game = pod_of(pods, "game")?;
    let web = range_of(slices, "web")?;
    let remote_addr = SocketAddrV4::new(ctx.s.remote_ip, REMOTE_PORT).to_string();
    let foreign = SocketAddrV4::new(ctx.s.node_ip, web.start + 2).to_string();
    // Only what the remote logs from now on counts: web's own earlier calls may legitimately
    // have left from this very port (the kernel picks it from web's range).
    let logged_before = remote.lines().len();
    for proto in ["tcp", "udp"] {
        let r = pod_exec(
            ctx,
            game,
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
            "{game} (slice game) reached the remote over {proto} from {foreign}, a port of slice web: {r:?}"
        );
    }
    // Positive control: the same pod from its own ports is seen by the remote.
    let own = pod_exec(
        ctx,
        game,
        &["portslice-e2e-agent", "dial", "udp", &remote_addr],
    )
    .await?;
    let own = probe::parse_answer(&own)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = remote.lines().split_off(logged_before);
    ensure!(
        seen.iter().any(|l| l.ends_with(&own.peer.to_string())),
        "the remote's log misses {game}'s own call from {}: {seen:?}",
        own.peer
    );
    let leaked: Vec<&String> = seen
        .iter()
        .filter(|l| l.ends_with(&format!(" {foreign}")))
        .collect();
    ensure!(
        leaked.is_empty(),
        "packets from {game} with web's source {foreign} reached the remote: {leaked:?}"
    );
    // And the remote's packets to web's ports reach web's pod only.
    let a = remote_dial(ctx, "tcp", SocketAddrV4::new(ctx.s.node_ip, web.start)).await?;
    ensure!(
        a.name == pod_of(pods, "web")?,
        "web's port answered by {}",
        a.name
    );
    Ok(())
}

/// A host process on a port outside every slice still gets the remote's traffic (matrix #7).
async fn host_port_passthrough(ctx: &Ctx) -> anyhow::Result<()> {
    let port = 39000 + (std::process::id() % 900) as u16;
    let agent = ctx.s.agent_bin.to_string_lossy().into_owned();
    let _host = shell::spawn(&[agent, "serve".into(), "--tcp".into(), port.to_string()])?;
    let addr = SocketAddrV4::new(ctx.s.node_ip, port);
    let a = wait_until(
        &format!("the host agent on {addr}"),
        Duration::from_secs(10),
        || async { Ok(remote_dial(ctx, "tcp", addr).await.ok()) },
    )
    .await?;
    ensure!(
        a.peer.ip() == &ctx.s.remote_ip,
        "host saw the remote as {}",
        a.peer
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// deletion

/// A deleted slice keeps its range while a pod of it runs; only when the pods are gone (plus
/// the quarantine) does the range go back, here to a slice that asked for exactly those ports.
async fn deleted_slice_keeps_range(
    ctx: &Ctx,
    slices: &BTreeMap<String, PortRange>,
) -> anyhow::Result<()> {
    let web = range_of(slices, "web")?;
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

async fn cleanup_namespace(ctx: &Ctx) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(ctx.client.clone());
    if nss.get_opt(&ctx.ns).await?.is_none() {
        return Ok(());
    }
    // Workloads first and wait for their pods: their CNI DEL needs the plugin still installed.
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let lp = ListParams::default().labels(&format!("{E2E_LABEL}=true"));
    dss.delete_collection(&DeleteParams::foreground(), &lp)
        .await?;
    deps.delete_collection(&DeleteParams::foreground(), &lp)
        .await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    wait_until("e2e pods to be gone", Duration::from_secs(90), || async {
        Ok(pods.list(&lp).await?.items.is_empty().then_some(()))
    })
    .await?;
    nss.delete(&ctx.ns, &DeleteParams::default()).await?;
    // The slices' finalizers need the operator (still installed here).
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
