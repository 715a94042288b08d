//! Publishing an allocated slice to the pods and clients that need its ports: its ConfigMap,
//! headless Service and EndpointSlice ([`objects`] builds them). Writes only what differs from
//! the watched copy (or, until the watch delivers our own last write, from that write), so a
//! reconcile that changes nothing writes nothing, and each change of a sliver's endpoint
//! (ready, terminating, gone) is one EndpointSlice write: the operator benchmark counts them.
pub mod objects;

use std::fmt::Debug;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use portslice_crds::{NamedPorts, PortRange, PortSlice};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::metrics::{Metrics, PublishLabels};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("failed to write {kind} {name}: {source}")]
    Write {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("{kind} {name} exists and is not PortSlice's; leaving it alone (rename or delete it)")]
    Foreign { kind: &'static str, name: String },
}

/// The watched copies of what we published (label-selected on `objects::MANAGED_BY`).
#[derive(Clone)]
pub struct Published {
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    /// Our last write of each object, until the watch delivers it.
    pub written: Written,
}

/// Our own last write of each object, for the moment before its watch event arrives: a
/// reconcile in that window (the pod event and the event of our own write each trigger one)
/// must not write the same thing again from the stale copy.
#[derive(Clone, Default)]
pub struct Written(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(&'static str, String), Write>>>,
);

struct Write {
    /// The watched copy's resourceVersion when we wrote (None: not watched yet).
    over: Option<String>,
    /// A hash of what we wrote: one entry per published object, so it stays small (a copy of
    /// the body would double the operator's memory at 10,000 slices).
    body: u64,
}

fn body_hash(body: &serde_json::Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.to_string().hash(&mut h);
    h.finish()
}

impl Written {
    /// Whether `body` is what we last wrote over the copy the store still holds. Once the
    /// store holds another version (ours, or someone's after it), the record goes: the store
    /// is the truth again, and the map stays as small as the writes in flight.
    fn pending(
        &self,
        key: &(&'static str, String),
        watched_rv: Option<&String>,
        body: &serde_json::Value,
    ) -> bool {
        let Ok(mut map) = self.0.lock() else {
            return false;
        };
        match map.get(key) {
            Some(w) if w.over.as_ref() == watched_rv => w.body == body_hash(body),
            Some(_) => {
                map.remove(key);
                false
            }
            None => false,
        }
    }

    fn forget(&self, key: &(&'static str, String)) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(key);
        }
    }

    fn record(&self, key: (&'static str, String), over: Option<String>, body: serde_json::Value) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(
                key,
                Write {
                    over,
                    body: body_hash(&body),
                },
            );
        }
    }
}

/// Field manager of our publishing writes (one per object kind would add nothing).
const MANAGER: &str = "portslice-operator";

/// Brings the slice's published objects to what `range`, `named` and `members` say.
pub async fn sync(
    client: &Client,
    published: &Published,
    metrics: &Metrics,
    slice: &PortSlice,
    range: PortRange,
    named: &[NamedPorts],
    members: &[&Pod],
) -> Result<(), PublishError> {
    let ns = slice.namespace().unwrap_or_default();
    let cm = objects::config_map(slice, range, named);
    apply(
        client,
        &published.config_maps,
        &published.written,
        metrics,
        &ns,
        cm,
        same_config_map,
    )
    .await?;
    let name = slice.name_any();
    if !objects::is_service_name(&name) {
        // No DNS name for a slice whose name cannot name a Service; the ConfigMap still works.
        return Ok(());
    }
    let annotations = objects::service_annotations(slice).unwrap_or_else(|e| {
        warn!(slice = %name, error = %e, "service annotations ignored");
        Default::default()
    });
    let svc = objects::service(slice, named, annotations);
    apply(
        client,
        &published.services,
        &published.written,
        metrics,
        &ns,
        svc,
        same_service,
    )
    .await?;
    for family in [objects::Family::V4, objects::Family::V6] {
        // IPv4 always (the slice's DNS name exists before its first sliver); IPv6 once a
        // sliver's node has an IPv6 address, and kept (emptied) after.
        let name = objects::endpoint_slice_name(&name, family);
        let exists = published
            .endpoint_slices
            .get(&ObjectRef::new(&name).within(&ns))
            .is_some();
        if family == objects::Family::V6 && !exists && !objects::any_address(members, family) {
            continue;
        }
        let es = objects::endpoint_slice(slice, named, members, family);
        apply(
            client,
            &published.endpoint_slices,
            &published.written,
            metrics,
            &ns,
            es,
            same_endpoint_slice,
        )
        .await?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the one place every publish write goes through
async fn apply<K>(
    client: &Client,
    store: &Store<K>,
    written: &Written,
    metrics: &Metrics,
    ns: &str,
    desired: K,
    same: fn(&K, &K) -> bool,
) -> Result<(), PublishError>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let kind = kind_of::<K>();
    let name = desired.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let current = store.get(&ObjectRef::new(&name).within(ns));
    let key = (kind, format!("{ns}/{name}"));
    // The common case, a reconcile that changes nothing, stops here without serializing. The
    // store has caught up with any write of ours, so its record goes: left behind, it would
    // make a deleted object look like our own write still in flight, never put back.
    if current.as_ref().is_some_and(|c| same(c, &desired)) {
        written.forget(&key);
        return Ok(());
    }
    let mut body = serde_json::to_value(&desired).unwrap_or_default();
    body["apiVersion"] = K::api_version(&()).into_owned().into();
    body["kind"] = K::kind(&()).into_owned().into();
    let watched_rv = current
        .as_ref()
        .and_then(|c| c.meta().resource_version.clone());
    if written.pending(&key, watched_rv.as_ref(), &body) {
        return Ok(());
    }
    match current {
        Some(_) => {}
        // Not among ours: it may not exist yet, or be someone else's under our name.
        None => {
            let existing = api
                .get_opt(&name)
                .await
                .map_err(|source| PublishError::Write {
                    kind,
                    name: name.clone(),
                    source,
                })?;
            if let Some(e) = existing
                && e.labels().get(objects::MANAGED_BY.0).map(String::as_str)
                    != Some(objects::MANAGED_BY.1)
            {
                return Err(PublishError::Foreign { kind, name });
            }
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| PublishError::Write {
        kind,
        name: name.clone(),
        source,
    })?;
    written.record(key, watched_rv, body);
    metrics
        .publish_writes
        .get_or_create(&PublishLabels { kind })
        .inc();
    info!(kind, %name, "published");
    Ok(())
}

fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "ConfigMap" => "ConfigMap",
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        _ => "object",
    }
}

/// Ours where it matters: labels and owner we set, plus the content.
fn same_meta<K: Resource>(current: &K, desired: &K) -> bool {
    let (c, d) = (current.meta(), desired.meta());
    let labels_kept = d
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| c.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    labels_kept && c.owner_references == d.owner_references
}

fn same_config_map(c: &ConfigMap, d: &ConfigMap) -> bool {
    same_meta(c, d) && c.data == d.data
}

fn same_service(c: &Service, d: &Service) -> bool {
    let ports = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|sp| sp.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name, p.protocol, p.port, p.target_port))
            .collect::<Vec<_>>()
    };
    let headless = |s: &Service| s.spec.as_ref().and_then(|sp| sp.cluster_ip.clone());
    same_meta(c, d)
        && c.metadata.annotations.clone().unwrap_or_default()
            == d.metadata.annotations.clone().unwrap_or_default()
        && ports(c) == ports(d)
        && headless(c) == headless(d)
}

fn same_endpoint_slice(c: &EndpointSlice, d: &EndpointSlice) -> bool {
    // The API server stores no ports as no field at all: `None` and `[]` are the same, or a
    // slice without named ports would be rewritten on every reconcile its own write triggers.
    let ports = |e: &EndpointSlice| e.ports.clone().unwrap_or_default();
    same_meta(c, d) && c.endpoints == d.endpoints && ports(c) == ports(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portslice_crds::{PortSliceSpec, Protocol};

    #[test]
    fn an_endpoint_slice_without_ports_reads_back_as_the_same() {
        let mut s = PortSlice::new("plain", PortSliceSpec::of_size(10));
        s.metadata.namespace = Some("tel".into());
        s.metadata.uid = Some("u".into());
        let desired = objects::endpoint_slice(&s, &[], &[], objects::Family::V4);
        let mut stored = desired.clone();
        stored.ports = None;
        assert!(same_endpoint_slice(&stored, &desired));
        stored.ports = Some(Vec::new());
        assert!(same_endpoint_slice(&stored, &desired));
    }

    #[test]
    fn the_api_servers_defaults_do_not_count_as_a_change() {
        let mut s = PortSlice::new("voice", PortSliceSpec::of_size(10));
        s.metadata.namespace = Some("tel".into());
        s.metadata.uid = Some("u".into());
        let named = [NamedPorts {
            name: "sip".into(),
            protocol: Protocol::UDP,
            port: 40000,
            count: 1,
        }];
        let desired = objects::service(&s, &named, Default::default());
        let mut current = desired.clone();
        let spec = current.spec.as_mut().unwrap();
        spec.type_ = Some("ClusterIP".into());
        spec.session_affinity = Some("None".into());
        current
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("other".into(), "x".into());
        assert!(same_service(&current, &desired));
        let moved = objects::service(
            &s,
            &[NamedPorts {
                port: 40001,
                ..named[0].clone()
            }],
            Default::default(),
        );
        assert!(!same_service(&current, &moved));
    }
}
