//! Load generator for `e2e/scripts/bench-operator.sh`: creates N PortSlices as fast as the API
//! server takes them, waits (watching) until every one holds a range, checks that no two ranges
//! overlap, and prints one JSON line with the timings.
//!
//! usage: bench --crd crds/portslice.io_portslices.yaml --namespace bench --count 10000
//!        bench --namespace bench --slivers 100
//!
//! `--slivers K` is the second phase, on slices already allocated: one pod each for the first K
//! slices appears (bound to a node, its status written as a kubelet would: hostIPs, Ready), the
//! operator publishes it into the slice's EndpointSlice, then the pods go and the endpoints with
//! them. The script counts the API requests of each phase, so writes per sliver change are
//! measured at the slice count of the first.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use portslice_crds::{PortRange, PortSlice, PortSliceSpec, SLICE_ANNOTATION};

#[derive(Parser)]
struct Args {
    #[arg(long, required_unless_present = "slivers")]
    crd: Option<std::path::PathBuf>,
    #[arg(long, default_value = "bench")]
    namespace: String,
    #[arg(long, required_unless_present = "slivers", default_value_t = 0)]
    count: usize,
    /// The sliver phase: pods for this many of the (allocated) slices come and go.
    #[arg(long)]
    slivers: Option<usize>,
    #[arg(long, default_value_t = 1)]
    size: u32,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::try_default()
        .await
        .context("client from KUBECONFIG")?;
    if let Some(k) = args.slivers {
        return slivers(&client, &args, k).await;
    }
    let crd = args.crd.as_ref().context("--crd")?;
    install_crd(&client, crd).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(args.namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .patch(
            &args.namespace,
            &PatchParams::apply("portslice-bench"),
            &Patch::Apply(&ns),
        )
        .await?;
    let api: Api<PortSlice> = Api::namespaced(client.clone(), &args.namespace);

    // Watch first, so that no allocation is missed.
    let watch_api = api.clone();
    let count = args.count;
    let watch = tokio::spawn(async move {
        let mut ranges: HashMap<String, PortRange> = HashMap::new();
        let mut events = watcher(watch_api, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(obj) = events.try_next().await? {
            if let Some(r) = obj.status.as_ref().and_then(|s| s.range) {
                ranges.insert(obj.name_any(), r);
                if ranges.len() == count {
                    return Ok::<_, anyhow::Error>(Instant::now());
                }
            }
        }
        bail!("watch ended early")
    });

    let start = Instant::now();
    let spec = PortSliceSpec::of_size(args.size);
    let results: Vec<Result<(), kube::Error>> = stream::iter(0..args.count)
        .map(|i| {
            let api = api.clone();
            let mut slice = PortSlice::new(&format!("s{i:05}"), spec.clone());
            slice.metadata.namespace = Some(args.namespace.clone());
            async move { api.create(&PostParams::default(), &slice).await.map(|_| ()) }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let created = start.elapsed();
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        bail!("creating slices failed: {e}");
    }
    let done = tokio::time::timeout(Duration::from_secs(args.timeout_secs), watch)
        .await
        .context("timed out waiting for every slice to be allocated")???;
    let allocated = done.duration_since(start);

    let list = api.list(&ListParams::default()).await?;
    let mut ranges: Vec<(String, PortRange)> = list
        .items
        .iter()
        .filter_map(|s| Some((s.name_any(), s.status.as_ref()?.range?)))
        .collect();
    ranges.sort_by_key(|(_, r)| r.start);
    let overlaps = ranges
        .windows(2)
        .filter(|w| w[0].1.end >= w[1].1.start)
        .count();
    println!(
        "{{\"count\":{},\"allocated\":{},\"overlaps\":{},\"create_secs\":{:.2},\"allocated_secs\":{:.2}}}",
        args.count,
        ranges.len(),
        overlaps,
        created.as_secs_f64(),
        allocated.as_secs_f64()
    );
    if overlaps > 0 || ranges.len() != args.count {
        bail!(
            "{overlaps} overlapping ranges, {} of {} allocated",
            ranges.len(),
            args.count
        );
    }
    Ok(())
}

/// Pods for slices `s00000..` come (status as a kubelet writes it) and go; waits for the
/// operator to put each into its slice's EndpointSlice and to take it out again.
async fn slivers(client: &Client, args: &Args, k: usize) -> anyhow::Result<()> {
    // No controller-manager runs beside the bench's API server: make the account pods need.
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), &args.namespace)
        .patch(
            "default",
            &PatchParams::apply("portslice-bench"),
            &Patch::Apply(&sa),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.namespace);
    let eps: Api<EndpointSlice> = Api::namespaced(client.clone(), &args.namespace);
    let start = Instant::now();
    let made: Vec<anyhow::Result<()>> = stream::iter(0..k)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let name = format!("p{i:05}");
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "annotations": {SLICE_ANNOTATION: format!("s{i:05}")}},
                    "spec": {"nodeName": format!("bench-node-{}", i % 3),
                             "automountServiceAccountToken": false,
                             "containers": [{"name": "c", "image": "none"}]}
                }))?;
                pods.create(&PostParams::default(), &pod).await?;
                let ip = format!("198.18.1.{}", 1 + i % 3);
                let status = serde_json::json!({"status": {
                    "phase": "Running", "hostIP": ip, "hostIPs": [{"ip": ip}],
                    "conditions": [{"type": "Ready", "status": "True"}]
                }});
                pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    if let Some(Err(e)) = made.into_iter().find(Result::is_err) {
        bail!("creating sliver pods failed: {e:#}");
    }
    let endpoints = |want: usize| {
        let eps = eps.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
            loop {
                let list = eps.list(&ListParams::default()).await?;
                let matching = list
                    .items
                    .iter()
                    .filter(|e| {
                        e.name_any()
                            .strip_prefix('s')
                            .and_then(|n| n.strip_suffix("-ipv4"))
                            .and_then(|n| n.parse::<usize>().ok())
                            .is_some_and(|n| n < k)
                            && e.endpoints.len() == want
                    })
                    .count();
                if matching == k {
                    return Ok::<_, anyhow::Error>(());
                }
                if Instant::now() > deadline {
                    bail!("{matching} of {k} EndpointSlices have {want} endpoints");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    endpoints(1).await?;
    let appeared = start.elapsed();
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let gone: Vec<Result<(), kube::Error>> = stream::iter(0..k)
        .map(|i| {
            let (pods, dp) = (pods.clone(), dp.clone());
            async move { pods.delete(&format!("p{i:05}"), &dp).await.map(|_| ()) }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    if let Some(Err(e)) = gone.into_iter().find(Result::is_err) {
        bail!("deleting sliver pods failed: {e}");
    }
    endpoints(0).await?;
    println!(
        "{{\"slivers\":{k},\"changes\":{},\"appeared_secs\":{:.2},\"total_secs\":{:.2}}}",
        2 * k,
        appeared.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn install_crd(client: &Client, path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    api.patch(
        &name,
        &PatchParams::apply("portslice-bench").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    for _ in 0..300 {
        let crd = api.get(&name).await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        if conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("CRD {name} never became established")
}
