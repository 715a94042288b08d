//! Per-slice source filtering follows the PortSlice: `spec.allowedSources` stays editable while
//! pods run, and this node's slice pods get an edit within a moment of it.
//!
//! ADD writes the list the pod's PortSlice had then; this watch applies every later edit to the
//! pods of that slice on this node, and the periodic pass ([`sync`], also run on each tick of
//! the reconcile loop) catches an edit that landed between an ADD's read and its attach.
//!
//! [`wanted`] is pure; the watch and the map writes are the I/O around it.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use portslice_crds::{PortRange, PortSlice};
use portslice_datapath::{PinnedDatapath, PodAttachment, SourceCidr};

use super::DaemonArgs;
use crate::node::lock::NodeLock;
use crate::slice_source::allowed_sources;

/// What a PortSlice says about its pods' filter: the range it holds (to tell its pods from a
/// static slice that happens to share its key) and the sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFilter {
    pub range: Option<PortRange>,
    pub sources: Vec<String>,
}

/// The filter each slice pod of this node should have, by container id: pods whose slice key
/// `namespace/name` names a PortSlice holding the pod's range. Entries that are no CIDR leave
/// the pod's filter as it is (never widened to "anyone"), with a warning.
pub fn wanted(
    pods: &[PodAttachment],
    slices: &BTreeMap<String, SliceFilter>,
) -> BTreeMap<String, Vec<SourceCidr>> {
    let mut out = BTreeMap::new();
    for pod in pods {
        let Some(binding) = &pod.slice else { continue };
        let Some(filter) = slices.get(&binding.slice_key) else {
            continue;
        };
        if filter.range != Some(binding.range) {
            continue;
        }
        match allowed_sources(&binding.slice_key, &filter.sources) {
            Ok(list) => {
                out.insert(pod.container_id.clone(), list);
            }
            Err(e) => tracing::warn!(error = %e, "keeping the pod's source filter as it is"),
        }
    }
    out
}

/// One pass: under the node lock, every slice pod whose list differs from its PortSlice's gets
/// the PortSlice's. Returns the container ids changed.
pub fn sync(
    pin_root: &Path,
    slices: &BTreeMap<String, SliceFilter>,
) -> anyhow::Result<Vec<String>> {
    let Some(mut dp) = PinnedDatapath::open_if_loaded(pin_root)? else {
        return Ok(Vec::new());
    };
    let _lock = NodeLock::acquire(pin_root, Duration::from_secs(10))?;
    let pods = dp.list_pods()?;
    let mut changed = Vec::new();
    for (container_id, want) in wanted(&pods, slices) {
        let have = dp.allowed_sources(&container_id)?;
        let mut want_sorted = want.clone();
        want_sorted.sort();
        want_sorted.dedup();
        if have == want_sorted {
            continue;
        }
        dp.set_allowed_sources(&container_id, &want)
            .with_context(|| format!("setting the allowed sources of {container_id}"))?;
        tracing::info!(%container_id, sources = want.len(), "allowed sources follow the PortSlice");
        changed.push(container_id);
    }
    Ok(changed)
}

/// The PortSlices' filters by key, from the watch's store.
pub fn filters(store: &Store<PortSlice>) -> BTreeMap<String, SliceFilter> {
    store
        .state()
        .iter()
        .filter_map(|s| {
            Some((
                format!("{}/{}", s.namespace()?, s.name_any()),
                SliceFilter {
                    range: s.status.as_ref().and_then(|st| st.range),
                    sources: s.spec.allowed_sources.clone(),
                },
            ))
        })
        .collect()
}

/// A client with the daemon's own credentials: the token file is re-read as the kubelet rotates
/// it (kube-client reloads a `tokenFile` every minute).
pub async fn client(args: &DaemonArgs, server: String) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: "cluster".into(),
            cluster: Some(Cluster {
                server: Some(server),
                certificate_authority: Some(args.ca_file.display().to_string()),
                ..Cluster::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "daemon".into(),
            auth_info: Some(AuthInfo {
                token_file: Some(args.token_file.display().to_string()),
                ..AuthInfo::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: "daemon".into(),
            context: Some(Context {
                cluster: "cluster".into(),
                user: Some("daemon".into()),
                ..Context::default()
            }),
            other: Default::default(),
        }],
        current_context: Some("daemon".into()),
        ..Kubeconfig::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("the daemon's API client config")?;
    Client::try_from(config).context("the daemon's API client")
}

/// Watches PortSlices and applies each change to this node's pods. Runs until the process ends;
/// a failed pass is logged and retried on the next change or tick.
pub async fn follow(
    args: DaemonArgs,
    client: Client,
    store_out: Arc<std::sync::OnceLock<Store<PortSlice>>>,
) {
    let (store, writer) = reflector::store();
    let _ = store_out.set(store.clone());
    let stream = watcher(Api::<PortSlice>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(|s: &mut PortSlice| {
            s.managed_fields_mut().clear();
            s.annotations_mut().clear();
        })
        .reflect(writer)
        .applied_objects();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        if let Err(e) = event {
            tracing::warn!(error = %e, "watching PortSlices");
            continue;
        }
        let (pin_root, slices) = (args.pin_root.clone(), filters(&store));
        match tokio::task::spawn_blocking(move || sync(&pin_root, &slices)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "applying allowed sources"),
            Err(e) => tracing::warn!(error = %e, "applying allowed sources"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portslice_datapath::SliceBinding;

    const R: PortRange = PortRange {
        start: 40000,
        end: 40009,
    };

    fn pod(id: &str, key: Option<&str>, range: PortRange) -> PodAttachment {
        PodAttachment {
            container_id: id.into(),
            host_veth_ifindex: 7,
            pod_private_ip: std::net::Ipv4Addr::new(10, 244, 0, 7),
            slice: key.map(|k| SliceBinding {
                slice_key: k.into(),
                range,
                protocols: portslice_crds::Protocol::ALL.to_vec(),
            }),
        }
    }

    #[test]
    fn pods_get_their_portslices_list_and_nothing_else() {
        let slices = BTreeMap::from([
            (
                "team/media".to_string(),
                SliceFilter {
                    range: Some(R),
                    sources: vec!["198.51.100.0/24".into()],
                },
            ),
            (
                "team/broken".to_string(),
                SliceFilter {
                    range: Some(R),
                    sources: vec!["nonsense".into()],
                },
            ),
        ]);
        let pods = [
            pod("a", Some("team/media"), R),
            // A static slice under the same key but another range is not the PortSlice's.
            pod(
                "b",
                Some("team/media"),
                PortRange {
                    start: 41000,
                    end: 41009,
                },
            ),
            pod("c", None, R),
            pod("d", Some("team/broken"), R),
            pod("e", Some("team/gone"), R),
        ];
        let w = wanted(&pods, &slices);
        assert_eq!(w.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(w["a"], vec!["198.51.100.0/24".parse().unwrap()]);
    }
}
