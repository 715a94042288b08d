//! The node's slice cache (see [`crate::slice_source::node_cache`]): a watch of the Pods of this
//! node (metadata only: the slice annotation and uid are all ADD needs), the PortSlice store the
//! daemon keeps anyway, and a unix socket in the state dir that answers the CNI plugin.
//!
//! The socket is root's alone (mode 0600 in a root directory): the plugin runs as root, and no
//! pod sees the state dir. What it answers is what the node's service account may read anyway.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use portslice_crds::{PortSlice, SLICE_ANNOTATION};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::slice_source::node_cache::{self, CacheRequest, CachedPod, CachedSlice};

/// A request is one short JSON line; anything longer is no request of ours.
const MAX_REQUEST: u64 = 4096;
/// How long one connection may take to say what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Cache {
    pods: Store<PartialObjectMeta<Pod>>,
    slices: Arc<OnceLock<Store<PortSlice>>>,
    synced: Arc<AtomicBool>,
}

impl Cache {
    fn answer(&self, request: &CacheRequest) -> node_cache::CacheAnswer {
        let Some(slices) = self.slices.get() else {
            return node_cache::CacheAnswer::default();
        };
        node_cache::answer(
            request,
            self.synced.load(Ordering::Acquire),
            |ns, name| {
                self.pods
                    .get(&ObjectRef::new(name).within(ns))
                    .map(|p| CachedPod {
                        uid: p.uid(),
                        slice: p.annotations().get(SLICE_ANNOTATION).cloned(),
                    })
            },
            |ns, name| {
                slices
                    .get(&ObjectRef::new(name).within(ns))
                    .map(|s| cached_slice(&s))
            },
        )
    }
}

fn cached_slice(s: &PortSlice) -> CachedSlice {
    CachedSlice {
        name: s.name_any(),
        uid: s.uid(),
        range: s.status.as_ref().and_then(|st| st.range),
        protocols: s.spec.protocols.clone(),
        allowed_sources: s.spec.allowed_sources.clone(),
    }
}

/// Watches this node's Pods and serves the cache at `<state dir>/slices.sock` until the process
/// ends. `slices` is the daemon's PortSlice store (set once its watch starts).
pub async fn serve(
    state_dir: PathBuf,
    node_name: String,
    client: Client,
    slices: Arc<OnceLock<Store<PortSlice>>>,
) -> anyhow::Result<()> {
    let (pods, writer) = reflector::store();
    let cache = Cache {
        pods: pods.clone(),
        slices: slices.clone(),
        synced: Arc::new(AtomicBool::new(false)),
    };
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let watch = watcher(Api::<PartialObjectMeta<Pod>>::all(client), config)
        .default_backoff()
        .modify(|p: &mut PartialObjectMeta<Pod>| {
            p.managed_fields_mut().clear();
            // Only the slice annotation is ever asked for.
            p.annotations_mut().retain(|k, _| k == SLICE_ANNOTATION);
            p.labels_mut().clear();
        })
        .reflect(writer)
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching this node's pods for the slice cache");
            }
        });
    tokio::spawn(watch);
    let synced = cache.synced.clone();
    tokio::spawn(async move {
        // Both watches have listed everything once: only then does "absent" mean anything.
        let slices = loop {
            if let Some(s) = slices.get() {
                break s.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if pods.wait_until_ready().await.is_ok() && slices.wait_until_ready().await.is_ok() {
            synced.store(true, Ordering::Release);
            tracing::info!("the slice cache is synced: CNI ADD needs no API request");
        }
    });

    let path = node_cache::socket_path(&state_dir);
    let listener = bind(&path)?;
    tracing::info!(socket = %path.display(), node = %node_name, "serving the slice cache");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a slice cache connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cache = cache.clone();
        tokio::spawn(async move {
            if let Err(e) = reply(stream, &cache).await {
                tracing::debug!(error = %format!("{e:#}"), "a slice cache request failed");
            }
        });
    }
}

/// Binds the socket afresh (a previous daemon's socket file is left behind when it exits),
/// readable and writable by root only.
fn bind(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the old {}", path.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root's alone", path.display()))?;
    Ok(listener)
}

async fn reply(stream: UnixStream, cache: &Cache) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await
    .context("no request in time")??;
    let request: CacheRequest = serde_json::from_str(&line).context("not a request")?;
    let answer = cache.answer(&request);
    tracing::debug!(?request, ?answer, "slice cache");
    let mut out = serde_json::to_vec(&answer)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}
