//! The kube-rs controller: watches PortSlices and their pods, keeps the [`index::SliceIndex`] in
//! step with the API server, and reconciles each slice ([`reconcile`]).
pub mod index;
pub mod pods;
mod reconcile;
pub mod refusals;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use portslice_crds::PortSlice;
use tracing::{debug, error, info, warn};

pub use reconcile::{Error, error_policy, reconcile};

use crate::config::Config;
use crate::leader::Fence;
use crate::metrics::Metrics;
use crate::server::Health;
use index::{SliceId, SliceIndex};

/// Field manager of every write the operator makes.
pub const MANAGER: &str = "portslice-operator";

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    pub pods: Store<Pod>,
    /// The nodes' refusal Events (see [`refusals`]).
    pub refusals: Store<CoreEvent>,
    /// What we published per slice (ConfigMaps, Services, EndpointSlices).
    pub published: crate::publish::Published,
    /// Closed when this replica's Lease may have run out: no ports are handed out then.
    pub fence: Arc<Fence>,
    shared: Arc<Shared>,
}

/// State shared between the watch streams (which feed it) and the reconciler (which asks it).
struct Shared {
    index: Mutex<SliceIndex>,
    pods_synced: AtomicBool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    wake: futures::channel::mpsc::UnboundedSender<ObjectRef<PortSlice>>,
    client: Client,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, SliceIndex> {
        // A panic while holding the lock leaves the table as it was before the failed call:
        // every index method validates before it mutates. Carry on with it.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn synced(&self) -> bool {
        self.pods_synced.load(Ordering::Acquire) && self.index().synced()
    }

    fn update_health(&self) {
        self.health.set_synced(self.synced());
    }

    fn publish_pool(&self) {
        let (stats, held) = self.index().stats();
        self.metrics.set_pool(stats, held);
    }

    /// Wakes every slice that waits for space.
    fn wake_waiters(&self) {
        let waiters = self.index().waiters();
        for w in waiters {
            // The receiver lives as long as the controller; after shutdown nobody needs waking.
            let _ = self.wake.unbounded_send(w);
        }
    }

    fn observe(self: &Arc<Self>, event: &watcher::Event<PortSlice>) {
        let seen = self.index().observe(event);
        for (id, range, holder) in &seen.overlaps {
            self.metrics.overlaps_detected.inc();
            error!(slice = %id, %range, holder = %holder, "status overlaps a range held by another slice");
        }
        if !seen.suspects.is_empty() {
            let this = self.clone();
            tokio::spawn(async move { this.verify_gone(seen.suspects).await });
        }
        if seen.freed {
            self.metrics.releases.inc();
            self.wake_waiters();
        }
        if matches!(event, watcher::Event::InitDone) {
            self.update_health();
        }
        self.publish_pool();
    }

    /// Frees the ranges of slices a re-list did not show, once a GET proves they are gone.
    async fn verify_gone(self: Arc<Self>, suspects: Vec<SliceId>) {
        let mut freed = false;
        for id in suspects {
            let api: Api<PortSlice> = Api::namespaced(self.client.clone(), &id.namespace);
            match api.get_opt(&id.name).await {
                Ok(Some(obj)) if obj.uid().as_deref() == Some(id.uid.as_str()) => {}
                Ok(_) => {
                    info!(slice = %id, "slice is gone; freeing its range");
                    freed |= self.index().forget(&id);
                }
                Err(e) => {
                    warn!(slice = %id, error = %e, "cannot verify that the slice is gone; keeping its range")
                }
            }
        }
        if freed {
            self.wake_waiters();
            self.publish_pool();
        }
    }
}

impl Context {
    fn synced(&self) -> bool {
        self.shared.synced()
    }

    fn index(&self) -> MutexGuard<'_, SliceIndex> {
        self.shared.index()
    }
}

/// Runs the controller until `shutdown` resolves (then finishes the reconciles in flight).
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    fence: Arc<Fence>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let (wake_tx, wake_rx) = futures::channel::mpsc::unbounded();
    let shared = Arc::new(Shared {
        index: Mutex::new(SliceIndex::new(config.allocatable.clone())),
        pods_synced: AtomicBool::new(false),
        metrics: metrics.clone(),
        health,
        wake: wake_tx,
        client: client.clone(),
    });
    shared.publish_pool();
    let (slice_api, pod_api, event_api): (Api<PortSlice>, Api<Pod>, Api<CoreEvent>) =
        match &config.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };

    let (slice_store, slice_writer) = reflector::store();
    let feed = shared.clone();
    let slices = watcher(slice_api, watcher::Config::default())
        .default_backoff()
        // managedFields (and kubectl's last-applied annotation) are most of an object's size
        // and the operator never reads them or the labels: 10,000 slices stay small in memory.
        .modify(|s: &mut PortSlice| {
            s.managed_fields_mut().clear();
            s.annotations_mut()
                .retain(|k, _| k == crate::publish::objects::SERVICE_ANNOTATIONS);
            s.labels_mut().clear();
        })
        .reflect(slice_writer)
        .inspect_ok(move |event| feed.observe(event))
        .touched_objects();

    let (pod_store, pod_writer) = reflector::store();
    let feed = shared.clone();
    let pods = watcher(pod_api, watcher::Config::default())
        .default_backoff()
        .modify(pods::strip)
        .reflect(pod_writer)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                feed.pods_synced.store(true, Ordering::Release);
                feed.update_health();
            }
        })
        .touched_objects();

    // Only the nodes' refusals, by field selector: the cluster's other Events never reach us.
    let (refusal_store, refusal_writer) = reflector::store();
    let refusal_events = watcher(
        event_api,
        watcher::Config::default().fields(&portslice_crds::refusal::field_selector()),
    )
    .default_backoff()
    .modify(|e: &mut CoreEvent| e.managed_fields_mut().clear())
    .reflect(refusal_writer)
    .touched_objects();

    // What we publish, label-selected: to write only what changed, and to put back what a
    // user deleted (each change reconciles its owner).
    let ours = watcher::Config::default().labels(&format!(
        "{}={}",
        crate::publish::objects::MANAGED_BY.0,
        crate::publish::objects::MANAGED_BY.1
    ));
    let (cm_store, cm_writer) = reflector::store();
    let cms = watcher(scoped::<ConfigMap>(&client, &config), ours.clone())
        .default_backoff()
        .modify(|o: &mut ConfigMap| o.managed_fields_mut().clear())
        .reflect(cm_writer)
        .touched_objects();
    let (svc_store, svc_writer) = reflector::store();
    let svcs = watcher(scoped::<Service>(&client, &config), ours.clone())
        .default_backoff()
        .modify(|o: &mut Service| o.managed_fields_mut().clear())
        .reflect(svc_writer)
        .touched_objects();
    let (es_store, es_writer) = reflector::store();
    let ess = watcher(scoped::<EndpointSlice>(&client, &config), ours)
        .default_backoff()
        .modify(|o: &mut EndpointSlice| o.managed_fields_mut().clear())
        .reflect(es_writer)
        .touched_objects();
    let published = crate::publish::Published {
        config_maps: cm_store,
        services: svc_store,
        endpoint_slices: es_store,
        written: Default::default(),
    };

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: Some(config.identity.clone()),
        },
    );
    let concurrency = config.concurrency;
    let ctx = Arc::new(Context {
        client,
        recorder,
        metrics,
        config,
        pods: pod_store,
        refusals: refusal_store,
        published,
        fence,
        shared,
    });
    info!("controller starting");
    Controller::for_stream(slices, slice_store)
        .watches_stream(pods, |pod: Pod| pods::slice_of(&pod))
        .owns_stream(cms)
        .owns_stream(svcs)
        .owns_stream(ess)
        .watches_stream(refusal_events, |e: CoreEvent| {
            portslice_crds::refusal::refused_slice(&e)
                .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
        })
        .reconcile_on(wake_rx)
        .with_config(controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "reconcile request failed");
            }
        })
        .await;
    info!("controller stopped");
    Ok(())
}

/// An Api of `K` in the watched namespace, or all of them.
fn scoped<K>(client: &Client, config: &Config) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
{
    match &config.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}
