//! Where a pod's slice comes from.
//!
//! In order:
//! 1. a range given directly (`PORTSLICE_RANGE` in CNI_ARGS, for runtimes without Kubernetes);
//! 2. a slice named in CNI_ARGS (`PORTSLICE_SLICE`);
//! 3. for a container without a Kubernetes namespace (podman passes only
//!    `K8S_POD_NAME=<container name>`), the static slice keyed by its name;
//! 4. the network's own slice (`slice` in the config: every other container on it joins it);
//! 5. the pod annotation, from the `io.kubernetes.cri.pod-annotations` capability when the runtime
//!    passes it (no API call), else from the Pod read from the API server.
//!
//! A name resolves to a static slice of the config's `slices` or to a PortSlice read from the
//! API server. Static keys follow the pod's namespace: `ns/name` matches only pods of `ns`, and a
//! bare `name` only containers without a namespace, so no namespace can borrow another's slice.
//!
//! [`plan`] is pure: it decides what, if anything, must be asked of the API server;
//! [`kube_lookup`] does the asking.

pub mod kube_lookup;
pub mod node_cache;

use std::collections::BTreeMap;

use portslice_crds::{PortRange, Protocol, SLICE_ANNOTATION};
use portslice_datapath::SourceCidr;

use crate::cni::error::{CniError, code};

/// CNI_ARGS key giving a range directly (`40000-40999`).
pub const ARG_RANGE: &str = "PORTSLICE_RANGE";
/// CNI_ARGS key naming a slice (static from the config, or a PortSlice in the pod's namespace).
pub const ARG_SLICE: &str = "PORTSLICE_SLICE";

/// Who the pod is, from the CNI_ARGS that kubelet/containerd pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
    pub infra_container_id: Option<String>,
}

impl PodIdentity {
    pub fn from_args(args: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
        Self {
            namespace: get("K8S_POD_NAMESPACE"),
            name: get("K8S_POD_NAME"),
            uid: get("K8S_POD_UID"),
            infra_container_id: get("K8S_POD_INFRA_CONTAINER_ID"),
        }
    }

    /// `namespace/name`, for logs and errors.
    pub fn display(&self) -> String {
        match (&self.namespace, &self.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.clone(),
            _ => "(no Kubernetes pod)".to_string(),
        }
    }
}

/// The slice a pod belongs to: exactly what the datapath records for it (`slice_key` is
/// `namespace/name` for PortSlices, the config key for static slices).
pub use portslice_datapath::SliceBinding;

/// A pod's slice, and the PortSlice it was read from (none for static slices and ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundSlice {
    pub binding: SliceBinding,
    pub portslice: Option<PortSliceRef>,
    /// The PortSlice's `spec.allowedSources` (empty: anyone; static slices have no filter).
    pub allowed_sources: Vec<SourceCidr>,
}

impl FoundSlice {
    /// A slice known without the API server.
    pub fn known(binding: SliceBinding) -> Self {
        Self {
            binding,
            portslice: None,
            allowed_sources: Vec::new(),
        }
    }
}

/// A PortSlice's `spec.allowedSources` as the datapath takes them. The CRD admits only CIDRs;
/// anything else (an older CRD, a hand-edited object) is refused rather than read as "anyone".
pub fn allowed_sources(slice: &str, list: &[String]) -> Result<Vec<SourceCidr>, CniError> {
    list.iter()
        .map(|text| {
            text.parse::<SourceCidr>().map_err(|e| {
                CniError::new(
                    code::INVALID_NETWORK_CONFIG,
                    format!("PortSlice {slice}: allowedSources entry {text:?} is not a CIDR"),
                )
                .with_details(e.to_string())
            })
        })
        .collect()
}

/// A PortSlice as ADD uses it, whoever read it (the API server or the node's cache): its range
/// (code 101 while it has none), protocols and checked `allowedSources`.
pub fn found_portslice(
    portslice: PortSliceRef,
    spec_protocols: &[Protocol],
    range: Option<PortRange>,
    allowed_sources: Vec<SourceCidr>,
) -> Result<FoundSlice, CniError> {
    Ok(FoundSlice {
        binding: slice_from_status(&portslice.namespace, &portslice.name, spec_protocols, range)?,
        portslice: Some(portslice),
        allowed_sources,
    })
}

/// The PortSlice object behind a slice: what a node's refusal Event is about.
pub use portslice_crds::refusal::RefusedSlice as PortSliceRef;

/// What must happen to find the pod's slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not a slice pod: pass through.
    NotASlicePod,
    /// Known without any API call.
    Known(SliceBinding),
    /// Read the PortSlice `namespace/name` for its range.
    ReadSlice { namespace: String, name: String },
    /// The runtime did not pass annotations: read the Pod, then maybe its PortSlice.
    ReadPod { namespace: String, name: String },
}

/// Inputs of [`plan`], borrowed from the config and environment.
pub struct PlanInput<'a> {
    pub args: &'a BTreeMap<String, String>,
    pub pod: &'a PodIdentity,
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub static_slices: &'a BTreeMap<String, PortRange>,
    /// The network's own slice (a key of `static_slices`).
    pub network_slice: Option<&'a str>,
    pub has_kubeconfig: bool,
}

fn both() -> Vec<Protocol> {
    Protocol::ALL.to_vec()
}

/// Whether a pod visibly asks for a slice, as far as can be told without a usable config: a
/// slice or range in CNI_ARGS, the network's own slice, or the annotation the runtime passed.
/// ADD fails such a pod when the config cannot be used, and passes every other pod through.
pub fn asks_for_slice(
    args: &BTreeMap<String, String>,
    annotations: Option<&BTreeMap<String, String>>,
    network_slice: bool,
) -> bool {
    args.contains_key(ARG_RANGE)
        || args.contains_key(ARG_SLICE)
        || network_slice
        || annotations.is_some_and(|a| a.contains_key(SLICE_ANNOTATION))
}

/// Decides where the slice comes from. Pure.
pub fn plan(input: &PlanInput<'_>) -> Result<Lookup, CniError> {
    if let Some(text) = input.args.get(ARG_RANGE) {
        let range = text.parse::<PortRange>().map_err(|e| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS {ARG_RANGE}={text:?} is not a port range"),
            )
            .with_details(e.to_string())
        })?;
        let name = input
            .args
            .get(ARG_SLICE)
            .cloned()
            .unwrap_or_else(|| format!("range-{range}"));
        return Ok(Lookup::Known(SliceBinding {
            slice_key: name,
            range,
            protocols: both(),
        }));
    }
    if let Some(name) = input.args.get(ARG_SLICE) {
        return resolve_name(input, name.trim());
    }
    if let (None, Some(name)) = (&input.pod.namespace, &input.pod.name)
        && let Some(found) = static_slice(input, name)
    {
        return Ok(found);
    }
    if let Some(key) = input.network_slice {
        return static_slice(input, key).ok_or_else(|| {
            CniError::new(
                code::INVALID_NETWORK_CONFIG,
                format!("the network's slice {key:?} is not in its slices"),
            )
        });
    }
    match (input.annotations, &input.pod.namespace) {
        (Some(annotations), _) => match annotations.get(SLICE_ANNOTATION) {
            Some(name) => resolve_name(input, name.trim()),
            None => Ok(Lookup::NotASlicePod),
        },
        // The runtime did not say: only the Pod object knows.
        (None, Some(namespace)) => Ok(match (&input.pod.name, input.has_kubeconfig) {
            (Some(name), true) => Lookup::ReadPod {
                namespace: namespace.clone(),
                name: name.clone(),
            },
            _ => Lookup::NotASlicePod,
        }),
        // No Kubernetes, and the container's name is no static slice's key.
        (None, None) => Ok(Lookup::NotASlicePod),
    }
}

/// The static slice stored under exactly `key`.
fn static_slice(input: &PlanInput<'_>, key: &str) -> Option<Lookup> {
    input.static_slices.get(key).map(|range| {
        Lookup::Known(SliceBinding {
            slice_key: key.to_string(),
            range: *range,
            protocols: both(),
        })
    })
}

/// A slice name (from the annotation or CNI_ARGS) to a static slice or an API lookup. A pod
/// with a namespace sees only the static slices keyed `namespace/name`.
pub fn resolve_name(input: &PlanInput<'_>, name: &str) -> Result<Lookup, CniError> {
    if name.is_empty() {
        return Err(CniError::new(
            code::SLICE_NOT_FOUND,
            format!("pod {} names an empty slice", input.pod.display()),
        ));
    }
    let key = match &input.pod.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    if let Some(found) = static_slice(input, &key) {
        return Ok(found);
    }
    match (&input.pod.namespace, input.has_kubeconfig) {
        (Some(ns), true) => Ok(Lookup::ReadSlice {
            namespace: ns.clone(),
            name: name.to_string(),
        }),
        _ => Err(CniError::new(
            code::SLICE_NOT_FOUND,
            format!(
                "slice {key:?} of pod {} is not in the config's static slices",
                input.pod.display()
            ),
        )
        .with_details(
            "static slices are keyed namespace/name for Kubernetes pods and name for containers without a namespace; without a kubeconfig only static slices can be used",
        )),
    }
}

/// Turns a PortSlice's status into a [`Slice`], or the error the pod's events should show.
pub fn slice_from_status(
    namespace: &str,
    name: &str,
    spec_protocols: &[Protocol],
    range: Option<PortRange>,
) -> Result<SliceBinding, CniError> {
    let range = range.ok_or_else(|| {
        CniError::new(
            code::SLICE_NOT_ALLOCATED,
            format!("PortSlice {namespace}/{name} has no range yet"),
        )
        .with_details("the operator has not allocated it (see `kubectl describe portslice`); the runtime retries")
    })?;
    let protocols = if spec_protocols.is_empty() {
        both()
    } else {
        spec_protocols.to_vec()
    };
    Ok(SliceBinding {
        slice_key: format!("{namespace}/{name}"),
        range,
        protocols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        args: BTreeMap<String, String>,
        pod: PodIdentity,
        annotations: Option<BTreeMap<String, String>>,
        statics: BTreeMap<String, PortRange>,
        network: Option<String>,
        kube: bool,
    }

    impl Case {
        fn k8s() -> Self {
            let args: BTreeMap<_, _> = [("K8S_POD_NAMESPACE", "team"), ("K8S_POD_NAME", "web-0")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Self {
                pod: PodIdentity::from_args(&args),
                args,
                annotations: None,
                statics: BTreeMap::new(),
                network: None,
                kube: true,
            }
        }
        fn annotated(mut self, slice: Option<&str>) -> Self {
            let mut a = BTreeMap::from([("other".to_string(), "x".to_string())]);
            if let Some(s) = slice {
                a.insert(SLICE_ANNOTATION.to_string(), s.to_string());
            }
            self.annotations = Some(a);
            self
        }
        fn plan(&self) -> Result<Lookup, CniError> {
            plan(&PlanInput {
                args: &self.args,
                pod: &self.pod,
                annotations: self.annotations.as_ref(),
                static_slices: &self.statics,
                network_slice: self.network.as_deref(),
                has_kubeconfig: self.kube,
            })
        }
    }

    #[test]
    fn identity_comes_from_cni_args() {
        let c = Case::k8s();
        assert_eq!(c.pod.display(), "team/web-0");
        assert_eq!(PodIdentity::default().display(), "(no Kubernetes pod)");
    }

    #[test]
    fn annotation_from_the_runtime_needs_only_the_slice_read() {
        let lookup = Case::k8s().annotated(Some("media")).plan().unwrap();
        assert_eq!(
            lookup,
            Lookup::ReadSlice {
                namespace: "team".into(),
                name: "media".into()
            }
        );
    }

    #[test]
    fn annotations_without_the_slice_key_pass_through_without_api_calls() {
        assert_eq!(
            Case::k8s().annotated(None).plan().unwrap(),
            Lookup::NotASlicePod
        );
    }

    #[test]
    fn without_annotations_the_pod_is_read() {
        let lookup = Case::k8s().plan().unwrap();
        assert_eq!(
            lookup,
            Lookup::ReadPod {
                namespace: "team".into(),
                name: "web-0".into()
            }
        );
        let mut no_kube = Case::k8s();
        no_kube.kube = false;
        assert_eq!(no_kube.plan().unwrap(), Lookup::NotASlicePod);
    }

    fn range(start: u16, end: u16) -> PortRange {
        PortRange { start, end }
    }

    fn known(lookup: Result<Lookup, CniError>) -> (String, u16) {
        match lookup {
            Ok(Lookup::Known(s)) => (s.slice_key, s.range.start),
            other => panic!("expected a static slice, got {other:?}"),
        }
    }

    #[test]
    fn static_slices_are_keyed_by_the_pods_namespace_only() {
        let mut c = Case::k8s().annotated(Some("media"));
        c.statics.insert("media".into(), range(1000, 1999));
        c.statics.insert("team/media".into(), range(2000, 2999));
        c.statics.insert("other/sip".into(), range(3000, 3009));
        assert_eq!(known(c.plan()), ("team/media".into(), 2000));
        // A bare key is for containers without a namespace: a pod never falls back to it.
        c.statics.remove("team/media");
        assert_eq!(
            c.plan().unwrap(),
            Lookup::ReadSlice {
                namespace: "team".into(),
                name: "media".into()
            }
        );
        c.kube = false;
        assert_eq!(c.plan().unwrap_err().code, code::SLICE_NOT_FOUND);
        // Another namespace's key is unreachable, whatever the pod writes.
        for name in ["sip", "other/sip", "../other/sip"] {
            let mut c = Case::k8s().annotated(Some(name));
            c.kube = false;
            c.statics.insert("other/sip".into(), range(3000, 3009));
            assert_eq!(c.plan().unwrap_err().code, code::SLICE_NOT_FOUND, "{name}");
        }
    }

    /// What podman's CNI backend passes: `IgnoreUnknown=1;K8S_POD_NAME=<container name>`.
    fn podman(container: &str) -> Case {
        let args: BTreeMap<_, _> = [("IgnoreUnknown", "1"), ("K8S_POD_NAME", container)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Case {
            pod: PodIdentity::from_args(&args),
            args,
            annotations: None,
            statics: BTreeMap::from([("sip".to_string(), range(5060, 5069))]),
            network: None,
            kube: false,
        }
    }

    #[test]
    fn a_pod_asks_for_a_slice_only_through_args_the_network_or_its_annotation() {
        let none = BTreeMap::new();
        assert!(!asks_for_slice(&none, None, false));
        let plain = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert!(!asks_for_slice(&none, Some(&plain), false));
        let annotated = BTreeMap::from([(SLICE_ANNOTATION.to_string(), "media".to_string())]);
        assert!(asks_for_slice(&none, Some(&annotated), false));
        assert!(asks_for_slice(&none, None, true));
        for key in [ARG_RANGE, ARG_SLICE] {
            let args = BTreeMap::from([(key.to_string(), "x".to_string())]);
            assert!(asks_for_slice(&args, None, false), "{key}");
        }
    }

    #[test]
    fn a_container_without_namespace_joins_the_static_slice_of_its_name() {
        assert_eq!(known(podman("sip").plan()), ("sip".into(), 5060));
        assert_eq!(podman("web").plan().unwrap(), Lookup::NotASlicePod);
    }

    #[test]
    fn the_networks_slice_takes_every_container_but_those_named_otherwise() {
        let mut c = podman("web");
        c.statics.insert("media".into(), range(40000, 40999));
        c.network = Some("media".into());
        assert_eq!(known(c.plan()), ("media".into(), 40000));
        c.args.insert(ARG_SLICE.into(), "sip".into());
        assert_eq!(known(c.plan()), ("sip".into(), 5060));
        c.args.remove(ARG_SLICE);
        let mut named = podman("sip");
        named.statics.insert("media".into(), range(40000, 40999));
        named.network = Some("media".into());
        assert_eq!(known(named.plan()), ("sip".into(), 5060), "its name wins");
        c.network = Some("gone".into());
        c.args.remove(ARG_SLICE);
        assert_eq!(c.plan().unwrap_err().code, code::INVALID_NETWORK_CONFIG);
    }

    #[test]
    fn range_in_cni_args_needs_nothing_else() {
        let args = BTreeMap::from([(ARG_RANGE.to_string(), "40000-40999".to_string())]);
        let c = Case {
            args,
            pod: PodIdentity::default(),
            annotations: None,
            statics: BTreeMap::new(),
            network: None,
            kube: false,
        };
        match c.plan().unwrap() {
            Lookup::Known(s) => assert_eq!(
                s.range,
                PortRange {
                    start: 40000,
                    end: 40999
                }
            ),
            other => panic!("{other:?}"),
        }
        let args = BTreeMap::from([(ARG_RANGE.to_string(), "99999".to_string())]);
        let c = Case {
            args,
            pod: PodIdentity::default(),
            annotations: None,
            statics: BTreeMap::new(),
            network: None,
            kube: false,
        };
        assert_eq!(c.plan().unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn unknown_static_slice_without_api_is_not_found() {
        let args = BTreeMap::from([(ARG_SLICE.to_string(), "nope".to_string())]);
        let c = Case {
            args,
            pod: PodIdentity::default(),
            annotations: None,
            statics: BTreeMap::new(),
            network: None,
            kube: false,
        };
        assert_eq!(c.plan().unwrap_err().code, code::SLICE_NOT_FOUND);
    }

    #[test]
    fn a_slice_without_range_is_code_101() {
        assert_eq!(
            slice_from_status("a", "b", &[], None).unwrap_err().code,
            code::SLICE_NOT_ALLOCATED
        );
        let s = slice_from_status(
            "a",
            "b",
            &[Protocol::UDP],
            Some(PortRange { start: 5, end: 6 }),
        )
        .unwrap();
        assert_eq!(
            (s.slice_key.as_str(), s.protocols.as_slice()),
            ("a/b", &[Protocol::UDP][..])
        );
    }
}
