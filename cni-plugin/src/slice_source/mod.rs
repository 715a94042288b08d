//! Where a pod's slice comes from.
//!
//! In order: a range given directly (`PORTSLICE_RANGE` in CNI_ARGS, for runtimes without
//! Kubernetes), a static slice named in CNI_ARGS (`PORTSLICE_SLICE`) or by the pod annotation and
//! listed in the config's `slices`, the PortSlice's status read from the API server. The
//! annotation comes from the `io.kubernetes.cri.pod-annotations` capability when the runtime
//! passes it (no API call), else from the Pod read from the API server.
//!
//! [`plan`] is pure: it decides what, if anything, must be asked of the API server;
//! [`kube_lookup`] does the asking.

pub mod kube_lookup;

use std::collections::BTreeMap;

use portslice_crds::{PortRange, Protocol, SLICE_ANNOTATION};

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

/// A slice the pod belongs to, with its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// `namespace/name` for PortSlices, the config key for static slices.
    pub name: String,
    pub range: PortRange,
    pub protocols: Vec<Protocol>,
}

/// What must happen to find the pod's slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not a slice pod: pass through.
    NotASlicePod,
    /// Known without any API call.
    Known(Slice),
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
    pub has_kubeconfig: bool,
}

fn both() -> Vec<Protocol> {
    vec![Protocol::TCP, Protocol::UDP]
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
        return Ok(Lookup::Known(Slice {
            name,
            range,
            protocols: both(),
        }));
    }
    let slice_name = match (input.args.get(ARG_SLICE), input.annotations) {
        (Some(name), _) => Some(name.clone()),
        (None, Some(annotations)) => annotations.get(SLICE_ANNOTATION).cloned(),
        (None, None) => {
            // The runtime did not say: only the Pod object knows.
            return Ok(
                match (&input.pod.namespace, &input.pod.name, input.has_kubeconfig) {
                    (Some(ns), Some(name), true) => Lookup::ReadPod {
                        namespace: ns.clone(),
                        name: name.clone(),
                    },
                    _ => Lookup::NotASlicePod,
                },
            );
        }
    };
    match slice_name {
        None => Ok(Lookup::NotASlicePod),
        Some(name) => resolve_name(input, name.trim()),
    }
}

/// A slice name (from the annotation or CNI_ARGS) to a static slice or an API lookup.
pub fn resolve_name(input: &PlanInput<'_>, name: &str) -> Result<Lookup, CniError> {
    if name.is_empty() {
        return Err(CniError::new(
            code::SLICE_NOT_FOUND,
            format!("pod {} names an empty slice", input.pod.display()),
        ));
    }
    let namespaced = input
        .pod
        .namespace
        .as_ref()
        .map(|ns| format!("{ns}/{name}"));
    for key in namespaced.iter().map(String::as_str).chain([name]) {
        if let Some(range) = input.static_slices.get(key) {
            return Ok(Lookup::Known(Slice {
                name: key.to_string(),
                range: *range,
                protocols: both(),
            }));
        }
    }
    match (&input.pod.namespace, input.has_kubeconfig) {
        (Some(ns), true) => Ok(Lookup::ReadSlice {
            namespace: ns.clone(),
            name: name.to_string(),
        }),
        _ => Err(CniError::new(
            code::SLICE_NOT_FOUND,
            format!(
                "slice {name:?} of pod {} is not in the config's static slices",
                input.pod.display()
            ),
        )
        .with_details(
            "without a kubeconfig and K8S_POD_NAMESPACE, only static slices can be used",
        )),
    }
}

/// Turns a PortSlice's status into a [`Slice`], or the error the pod's events should show.
pub fn slice_from_status(
    namespace: &str,
    name: &str,
    spec_protocols: &[Protocol],
    range: Option<PortRange>,
) -> Result<Slice, CniError> {
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
    Ok(Slice {
        name: format!("{namespace}/{name}"),
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

    #[test]
    fn static_slices_win_namespaced_first() {
        let mut c = Case::k8s().annotated(Some("media"));
        c.statics.insert(
            "media".into(),
            PortRange {
                start: 1000,
                end: 1999,
            },
        );
        c.statics.insert(
            "team/media".into(),
            PortRange {
                start: 2000,
                end: 2999,
            },
        );
        match c.plan().unwrap() {
            Lookup::Known(s) => assert_eq!((s.name.as_str(), s.range.start), ("team/media", 2000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn range_in_cni_args_needs_nothing_else() {
        let args = BTreeMap::from([(ARG_RANGE.to_string(), "40000-40999".to_string())]);
        let c = Case {
            args,
            pod: PodIdentity::default(),
            annotations: None,
            statics: BTreeMap::new(),
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
            (s.name.as_str(), s.protocols.as_slice()),
            ("a/b", &[Protocol::UDP][..])
        );
    }
}
