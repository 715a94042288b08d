//! `/metrics` (per-slice counters read from the pinned maps at scrape time), `/healthz` (the
//! datapath is up: liveness) and `/readyz` (and the node is set up for slice pods: the plugin
//! is in the conflist with its kubeconfig, the cluster CIDRs detected or given).
use std::{collections::BTreeMap, path::PathBuf};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::chain_state::ChainState;
use super::conflist::ChainReport;
use portslice_datapath::{PinnedDatapath, abi, loader};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SliceLabels {
    slice: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    slice: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UplinkLabels {
    uplink: String,
    node_ip: String,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CidrLabels {
    cidr: String,
    source: &'static str,
}

/// What the daemon chose on this node, for `/metrics`: the uplink and the cluster CIDRs, and
/// whether it detected them or was told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub uplink: String,
    pub node_ip: String,
    pub uplink_detected: bool,
    pub cluster_cidrs: Vec<String>,
    pub cidrs_detected: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConflistLabels {
    file: String,
    cni_version: String,
    plugins: String,
    supported: String,
}

/// What `/metrics` and `/healthz` read: the pinned datapath, the conflist last found and what
/// the daemon chose on this node.
#[derive(Clone)]
pub struct MetricsState {
    pub pin_root: PathBuf,
    pub chain: ChainState,
    pub facts: std::sync::Arc<std::sync::RwLock<NodeFacts>>,
    /// Set once the node is set up for slice pods (the daemon's start is done).
    pub ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Per-slice sums of the per-pod counters (a slice has at most one pod per node, but pods of a
/// deleted-and-recreated slice may briefly overlap).
pub fn per_slice(
    pods: &[portslice_datapath::PodAttachment],
    stats: &BTreeMap<u32, abi::PodStats>,
) -> BTreeMap<String, abi::PodStats> {
    let mut out: BTreeMap<String, abi::PodStats> = BTreeMap::new();
    for p in pods {
        let (Some(s), Some(st)) = (&p.slice, stats.get(&p.host_veth_ifindex)) else {
            continue;
        };
        let e = out.entry(s.slice_key.clone()).or_default();
        e.rx_packets += st.rx_packets;
        e.rx_bytes += st.rx_bytes;
        e.tx_packets += st.tx_packets;
        e.tx_bytes += st.tx_bytes;
        e.drop_src_port += st.drop_src_port;
        e.drop_other += st.drop_other;
        e.drop_icmp_error += st.drop_icmp_error;
        e.drop_source += st.drop_source;
    }
    out
}

/// Renders the exposition text from the pinned maps and the conflist report.
pub fn render(
    pin_root: &std::path::Path,
    chain: Option<&ChainReport>,
    facts: Option<&NodeFacts>,
) -> Result<String, String> {
    let dp = PinnedDatapath::open(pin_root).map_err(|e| e.to_string())?;
    let pods = dp.list_pods().map_err(|e| e.to_string())?;
    let stats = dp.pod_stats().map_err(|e| e.to_string())?;
    let global = dp.global_stats().map_err(|e| e.to_string())?;

    let mut reg = Registry::with_prefix("portslice");
    let fam = |reg: &mut Registry, name: &str, help: &str| {
        let f = Family::<SliceLabels, Counter>::default();
        reg.register(name, help, f.clone());
        f
    };
    let rx_p = fam(
        &mut reg,
        "slice_rx_packets",
        "Packets steered into the slice's pod",
    );
    let rx_b = fam(
        &mut reg,
        "slice_rx_bytes",
        "Bytes steered into the slice's pod",
    );
    let tx_p = fam(
        &mut reg,
        "slice_tx_packets",
        "Node-address packets the slice's pod sent",
    );
    let tx_b = fam(
        &mut reg,
        "slice_tx_bytes",
        "Node-address bytes the slice's pod sent",
    );
    let drops = Family::<DropLabels, Counter>::default();
    reg.register(
        "slice_drops",
        "Packets of the slice's pod refused by the datapath",
        drops.clone(),
    );
    let events = Family::<EventLabels, Counter>::default();
    reg.register(
        "datapath_packets",
        "Node-wide datapath events",
        events.clone(),
    );
    let attached = Gauge::<i64>::default();
    reg.register(
        "attached_pods",
        "Pods attached to the datapath",
        attached.clone(),
    );

    for (slice, s) in per_slice(&pods, &stats) {
        let l = SliceLabels {
            slice: slice.clone(),
        };
        rx_p.get_or_create(&l).inc_by(s.rx_packets);
        rx_b.get_or_create(&l).inc_by(s.rx_bytes);
        tx_p.get_or_create(&l).inc_by(s.tx_packets);
        tx_b.get_or_create(&l).inc_by(s.tx_bytes);
        // source_port: sent from a port outside the slice; icmp_error: an ICMP error about a
        // flow not the pod's own; source: arrived from outside the slice's allowed sources.
        for (reason, v) in [
            ("source_port", s.drop_src_port),
            ("other", s.drop_other),
            ("icmp_error", s.drop_icmp_error),
            ("source", s.drop_source),
        ] {
            drops
                .get_or_create(&DropLabels {
                    slice: slice.clone(),
                    reason: reason.into(),
                })
                .inc_by(v);
        }
    }
    for (name, v) in global {
        events
            .get_or_create(&EventLabels { event: name.into() })
            .inc_by(v);
    }
    attached.set(pods.len() as i64);
    register_chain(&mut reg, chain);
    if let Some(f) = facts {
        register_facts(&mut reg, f);
    }
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

/// `portslice_node_uplink_info` and `portslice_cluster_cidr_info`.
fn register_facts(reg: &mut Registry, f: &NodeFacts) {
    let uplink = Family::<UplinkLabels, Gauge<i64>>::default();
    reg.register(
        "node_uplink_info",
        "The interface the node address lives on, where the ingress program attaches",
        uplink.clone(),
    );
    uplink
        .get_or_create(&UplinkLabels {
            uplink: f.uplink.clone(),
            node_ip: f.node_ip.clone(),
            source: if f.uplink_detected {
                "detected"
            } else {
                "configured"
            },
        })
        .set(1);
    let cidrs = Family::<CidrLabels, Gauge<i64>>::default();
    reg.register(
        "cluster_cidr_info",
        "The pod and service CIDRs slice pods reach from their private address",
        cidrs.clone(),
    );
    for c in &f.cluster_cidrs {
        cidrs
            .get_or_create(&CidrLabels {
                cidr: c.clone(),
                source: if f.cidrs_detected {
                    "detected"
                } else {
                    "configured"
                },
            })
            .set(1);
    }
}

/// `portslice_cni_conflist_found` and, when found, `portslice_cni_conflist_info`.
fn register_chain(reg: &mut Registry, chain: Option<&ChainReport>) {
    let found = Gauge::<i64>::default();
    reg.register(
        "cni_conflist_found",
        "Whether the node has a CNI conflist for portslice to join",
        found.clone(),
    );
    found.set(i64::from(chain.is_some()));
    let Some(r) = chain else { return };
    let info = Family::<ConflistLabels, Gauge<i64>>::default();
    reg.register(
        "cni_conflist_info",
        "The conflist portslice joined: file, cniVersion, plugin chain, whether we speak that version",
        info.clone(),
    );
    info.get_or_create(&ConflistLabels {
        file: r.file.clone(),
        cni_version: r.cni_version.clone(),
        plugins: r.plugins.join(","),
        supported: r.version_supported.to_string(),
    })
    .set(1);
}

pub fn router(state: MetricsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(
    State(state): State<MetricsState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let ct = [(
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    let report = state.chain.get();
    let facts = state.facts.read().map(|f| f.clone()).ok();
    match tokio::task::spawn_blocking(move || {
        render(&state.pin_root, report.as_ref(), facts.as_ref())
    })
    .await
    {
        Ok(Ok(text)) => (StatusCode::OK, ct, text),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, ct, e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, ct, e.to_string()),
    }
}

async fn healthz(State(state): State<MetricsState>) -> (StatusCode, String) {
    match loader::healthy(&state.pin_root, true) {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

async fn readyz(State(state): State<MetricsState>) -> (StatusCode, String) {
    if !state.ready.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: detecting the cluster CIDRs and joining the conflist\n".into(),
        );
    }
    healthz(State(state)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use portslice_datapath::{PodAttachment, PortRange, Protocol, SliceBinding};
    use std::net::Ipv4Addr;

    #[test]
    fn sums_counters_per_slice() {
        let mk = |id: &str, ifx: u32, slice: Option<&str>| PodAttachment {
            container_id: id.into(),
            host_veth_ifindex: ifx,
            pod_private_ip: Ipv4Addr::LOCALHOST,
            slice: slice.map(|s| SliceBinding {
                slice_key: s.into(),
                range: PortRange { start: 1, end: 2 },
                protocols: vec![Protocol::TCP],
            }),
        };
        let pods = [
            mk("a", 1, Some("ns/x")),
            mk("b", 2, Some("ns/x")),
            mk("c", 3, None),
        ];
        let mut st = BTreeMap::new();
        st.insert(
            1,
            abi::PodStats {
                rx_packets: 2,
                drop_src_port: 1,
                drop_icmp_error: 4,
                ..Default::default()
            },
        );
        st.insert(
            2,
            abi::PodStats {
                rx_packets: 3,
                drop_source: 2,
                ..Default::default()
            },
        );
        st.insert(
            3,
            abi::PodStats {
                rx_packets: 9,
                ..Default::default()
            },
        );
        let s = per_slice(&pods, &st);
        assert_eq!(s.len(), 1);
        assert_eq!(s["ns/x"].rx_packets, 5);
        assert_eq!(s["ns/x"].drop_src_port, 1);
        assert_eq!(s["ns/x"].drop_icmp_error, 4);
        assert_eq!(s["ns/x"].drop_source, 2);
    }
}
