//! The node daemon's slice cache: what ADD asks it instead of the API server.
//!
//! The daemon watches the Pods of its node and every PortSlice, and answers one question per
//! connection on a unix socket in the state dir ([`SOCKET`]): "what is pod P's slice annotation,
//! and what does PortSlice S hold?". An answer is only ever a shortcut: whatever the cache does
//! not know for sure (it has not synced yet, the pod is not in it or has another uid, the slice
//! is missing or not allocated there) falls back to the API server, which stays the authority,
//! so a lagging watch costs an API round trip and never a wrong or refused pod.
//!
//! This file is the protocol and the pure decision; the client is [`ask`], the server lives in
//! the daemon (`daemon/slice_cache.rs`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portslice_crds::{PortRange, Protocol};
use serde::{Deserialize, Serialize};

use super::{FoundSlice, Lookup, PlanInput, PortSliceRef, allowed_sources, resolve_name};
use crate::cni::error::CniError;

/// The socket's name in the state dir.
pub const SOCKET: &str = "slices.sock";

/// Where the daemon listens for a state dir.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// A question: the pod (its annotation is wanted when `slice` is `None`), or the slice named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRequest {
    pub namespace: String,
    pub pod: Option<String>,
    pub slice: Option<String>,
}

/// What the daemon knows; `None` fields are what it does not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheAnswer {
    /// Both watches have listed everything once: before that, an absent object proves nothing.
    pub synced: bool,
    pub pod: Option<CachedPod>,
    /// The PortSlice named in the request, else the one the pod's annotation names.
    pub slice: Option<CachedSlice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPod {
    pub uid: Option<String>,
    /// The `portslice.io/slice` annotation.
    pub slice: Option<String>,
}

/// The parts of a PortSlice a pod's wiring needs, as the API server would give them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedSlice {
    pub name: String,
    pub uid: Option<String>,
    pub range: Option<PortRange>,
    pub protocols: Vec<Protocol>,
    pub allowed_sources: Vec<String>,
}

/// The daemon's answer to `request` from what its watches hold (`pod` and `slice` look an
/// object up by namespace and name). Pure.
pub fn answer(
    request: &CacheRequest,
    synced: bool,
    pod: impl Fn(&str, &str) -> Option<CachedPod>,
    slice: impl Fn(&str, &str) -> Option<CachedSlice>,
) -> CacheAnswer {
    if !synced {
        return CacheAnswer::default();
    }
    let pod = request
        .pod
        .as_deref()
        .and_then(|name| pod(&request.namespace, name));
    let wanted = request
        .slice
        .clone()
        .or_else(|| pod.as_ref().and_then(|p| p.slice.clone()));
    CacheAnswer {
        synced,
        slice: wanted.and_then(|name| slice(&request.namespace, name.trim())),
        pod,
    }
}

/// What ADD makes of an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The slice, exactly as reading it from the API server would have given it.
    Found(Box<FoundSlice>),
    /// The pod is known and asks for no slice.
    NotASlicePod,
    /// Ask the API server (the plan's lookup, unchanged).
    AskTheApiServer,
}

/// The request for a lookup that needs the API server; `None` for the others.
pub fn request_for(lookup: &Lookup) -> Option<CacheRequest> {
    match lookup {
        Lookup::ReadSlice { namespace, name } => Some(CacheRequest {
            namespace: namespace.clone(),
            pod: None,
            slice: Some(name.clone()),
        }),
        Lookup::ReadPod { namespace, name } => Some(CacheRequest {
            namespace: namespace.clone(),
            pod: Some(name.clone()),
            slice: None,
        }),
        Lookup::NotASlicePod | Lookup::Known(_) => None,
    }
}

/// Decides from the answer to [`request_for`]`(lookup)`. Pure. A slice the cache knows goes
/// through the same checks as one read from the API server (its `allowedSources` must parse).
pub fn decide(
    lookup: &Lookup,
    input: &PlanInput<'_>,
    answer: &CacheAnswer,
) -> Result<Decision, CniError> {
    if !answer.synced {
        return Ok(Decision::AskTheApiServer);
    }
    let (namespace, slice_name) = match lookup {
        Lookup::ReadSlice { namespace, name } => (namespace, name.clone()),
        Lookup::ReadPod { namespace, .. } => {
            let Some(pod) = &answer.pod else {
                return Ok(Decision::AskTheApiServer);
            };
            // Another pod of the same name (deleted and created again): the cache lags.
            if input.pod.uid.is_some() && pod.uid.is_some() && input.pod.uid != pod.uid {
                return Ok(Decision::AskTheApiServer);
            }
            let Some(name) = &pod.slice else {
                return Ok(Decision::NotASlicePod);
            };
            match resolve_name(input, name.trim())? {
                Lookup::Known(binding) => {
                    return Ok(Decision::Found(Box::new(FoundSlice::known(binding))));
                }
                Lookup::ReadSlice { name, .. } => (namespace, name),
                _ => return Ok(Decision::AskTheApiServer),
            }
        }
        Lookup::NotASlicePod | Lookup::Known(_) => return Ok(Decision::AskTheApiServer),
    };
    // Missing or unallocated here may be a watch that lags: only the API server may say so.
    let Some(slice) = answer.slice.as_ref().filter(|s| s.name == slice_name) else {
        return Ok(Decision::AskTheApiServer);
    };
    let Some(range) = slice.range else {
        return Ok(Decision::AskTheApiServer);
    };
    let found = super::found_portslice(
        PortSliceRef {
            namespace: namespace.clone(),
            name: slice_name.clone(),
            uid: slice.uid.clone(),
        },
        &slice.protocols,
        Some(range),
        allowed_sources(&format!("{namespace}/{slice_name}"), &slice.allowed_sources)?,
    )?;
    Ok(Decision::Found(Box::new(found)))
}

/// How long ADD waits for the daemon before asking the API server instead: the daemon answers
/// from memory in well under a millisecond, so this only bounds a stuck one.
pub const ASK_TIMEOUT: Duration = Duration::from_millis(250);

/// Asks the daemon listening at `socket`. `None` when it cannot be asked (no daemon, an old one,
/// a stuck one, garbage): the caller then asks the API server.
pub fn ask(socket: &Path, request: &CacheRequest) -> Option<CacheAnswer> {
    let attempt = || -> std::io::Result<CacheAnswer> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(ASK_TIMEOUT))?;
        stream.set_write_timeout(Some(ASK_TIMEOUT))?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(serde_json::from_str(&reply)?)
    };
    match attempt() {
        Ok(answer) => Some(answer),
        Err(e) => {
            tracing::debug!(socket = %socket.display(), error = %e, "the node's slice cache did not answer; asking the API server");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::code;
    use crate::slice_source::PodIdentity;
    use std::collections::BTreeMap;

    const R: PortRange = PortRange {
        start: 40000,
        end: 40009,
    };

    struct Fixture {
        args: BTreeMap<String, String>,
        pod: PodIdentity,
        statics: BTreeMap<String, PortRange>,
    }

    impl Fixture {
        fn new() -> Self {
            let args = BTreeMap::from([
                ("K8S_POD_NAMESPACE".to_string(), "team".to_string()),
                ("K8S_POD_NAME".to_string(), "web-0".to_string()),
                ("K8S_POD_UID".to_string(), "u1".to_string()),
            ]);
            Self {
                pod: PodIdentity::from_args(&args),
                args,
                statics: BTreeMap::new(),
            }
        }
        fn decide(&self, lookup: &Lookup, answer: &CacheAnswer) -> Result<Decision, CniError> {
            let input = PlanInput {
                args: &self.args,
                pod: &self.pod,
                annotations: None,
                static_slices: &self.statics,
                network_slice: None,
                has_kubeconfig: true,
            };
            decide(lookup, &input, answer)
        }
    }

    fn read_pod() -> Lookup {
        Lookup::ReadPod {
            namespace: "team".into(),
            name: "web-0".into(),
        }
    }

    fn media(range: Option<PortRange>) -> CachedSlice {
        CachedSlice {
            name: "media".into(),
            uid: Some("s1".into()),
            range,
            protocols: vec![Protocol::UDP],
            allowed_sources: vec!["198.51.100.0/24".into()],
        }
    }

    fn cached(pod: Option<(&str, Option<&str>)>, slice: Option<CachedSlice>) -> CacheAnswer {
        CacheAnswer {
            synced: true,
            pod: pod.map(|(uid, s)| CachedPod {
                uid: Some(uid.into()),
                slice: s.map(Into::into),
            }),
            slice,
        }
    }

    #[test]
    fn a_known_pod_and_allocated_slice_need_no_api_server() {
        let f = Fixture::new();
        let d = f
            .decide(
                &read_pod(),
                &cached(Some(("u1", Some("media"))), Some(media(Some(R)))),
            )
            .unwrap();
        let Decision::Found(found) = d else {
            panic!("{d:?}")
        };
        assert_eq!(found.binding.slice_key, "team/media");
        assert_eq!(found.binding.range, R);
        assert_eq!(found.binding.protocols, vec![Protocol::UDP]);
        assert_eq!(found.portslice.as_ref().unwrap().uid.as_deref(), Some("s1"));
        assert_eq!(found.allowed_sources.len(), 1);
        assert_eq!(
            f.decide(&read_pod(), &cached(Some(("u1", None)), None))
                .unwrap(),
            Decision::NotASlicePod
        );
    }

    #[test]
    fn whatever_the_cache_cannot_vouch_for_goes_to_the_api_server() {
        let f = Fixture::new();
        let ask = |a: CacheAnswer| f.decide(&read_pod(), &a).unwrap();
        let full = cached(Some(("u1", Some("media"))), Some(media(Some(R))));
        assert_eq!(
            ask(CacheAnswer {
                synced: false,
                ..full.clone()
            }),
            Decision::AskTheApiServer,
            "not synced"
        );
        assert_eq!(
            ask(cached(None, None)),
            Decision::AskTheApiServer,
            "pod unknown"
        );
        assert_eq!(
            ask(cached(Some(("u0", Some("media"))), Some(media(Some(R))))),
            Decision::AskTheApiServer,
            "an older pod of the same name"
        );
        assert_eq!(
            ask(cached(Some(("u1", Some("media"))), None)),
            Decision::AskTheApiServer,
            "slice unknown"
        );
        assert_eq!(
            ask(cached(Some(("u1", Some("media"))), Some(media(None)))),
            Decision::AskTheApiServer,
            "not allocated here"
        );
        let mut other = media(Some(R));
        other.name = "sip".into();
        assert_eq!(
            ask(cached(Some(("u1", Some("media"))), Some(other))),
            Decision::AskTheApiServer,
            "an answer about another slice"
        );
    }

    #[test]
    fn a_slice_named_by_the_runtime_needs_only_the_slice() {
        let f = Fixture::new();
        let lookup = Lookup::ReadSlice {
            namespace: "team".into(),
            name: "media".into(),
        };
        assert!(matches!(
            f.decide(&lookup, &cached(None, Some(media(Some(R)))))
                .unwrap(),
            Decision::Found(_)
        ));
        assert_eq!(
            request_for(&lookup),
            Some(CacheRequest {
                namespace: "team".into(),
                pod: None,
                slice: Some("media".into())
            })
        );
    }

    #[test]
    fn the_daemon_answers_with_the_slice_the_pods_annotation_names_in_its_namespace() {
        let pods = |ns: &str, name: &str| {
            (ns == "team" && name == "web-0").then(|| CachedPod {
                uid: Some("u1".into()),
                slice: Some(" media".into()),
            })
        };
        let slices =
            |ns: &str, name: &str| (ns == "team" && name == "media").then(|| media(Some(R)));
        let req = |pod: Option<&str>, slice: Option<&str>| CacheRequest {
            namespace: "team".into(),
            pod: pod.map(Into::into),
            slice: slice.map(Into::into),
        };
        let a = answer(&req(Some("web-0"), None), true, pods, slices);
        assert_eq!(a.pod.unwrap().uid.as_deref(), Some("u1"));
        assert_eq!(a.slice.unwrap().name, "media");
        assert_eq!(
            answer(&req(None, Some("media")), true, pods, slices)
                .slice
                .map(|s| s.name),
            Some("media".into())
        );
        assert_eq!(
            answer(&req(Some("web-1"), None), true, pods, slices),
            CacheAnswer {
                synced: true,
                ..Default::default()
            }
        );
        let other_ns = CacheRequest {
            namespace: "other".into(),
            ..req(Some("web-0"), None)
        };
        assert_eq!(answer(&other_ns, true, pods, slices).slice, None);
        assert_eq!(
            answer(&req(Some("web-0"), None), false, pods, slices),
            CacheAnswer::default()
        );
    }

    #[test]
    fn the_cached_slice_passes_the_api_paths_checks() {
        let f = Fixture::new();
        let mut bad = media(Some(R));
        bad.allowed_sources = vec!["anyone".into()];
        let e = f
            .decide(&read_pod(), &cached(Some(("u1", Some("media"))), Some(bad)))
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
    }

    #[test]
    fn an_annotation_naming_a_static_slice_resolves_locally() {
        let mut f = Fixture::new();
        f.statics.insert("team/sip".into(), R);
        let d = f
            .decide(&read_pod(), &cached(Some(("u1", Some("sip"))), None))
            .unwrap();
        assert!(
            matches!(&d, Decision::Found(s) if s.binding.slice_key == "team/sip" && s.portslice.is_none()),
            "{d:?}"
        );
    }
}
