//! The API server side of [`super::plan`]: read the Pod's annotation and the PortSlice's range.
//! One deadline bounds the whole exchange (client setup included); when it passes, ADD fails with
//! code 11 so the runtime retries rather than hanging pod creation.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use portslice_crds::{PortSlice, SLICE_ANNOTATION};

use super::{
    FoundSlice, Lookup, PlanInput, PortSliceRef, allowed_sources, found_portslice, resolve_name,
};
use crate::cni::error::{CniError, code};

/// Resolves a [`Lookup`] that needs the API server. Returns `None` for pods without a slice.
pub async fn resolve(
    lookup: Lookup,
    input: &PlanInput<'_>,
    kubeconfig: Option<&Path>,
    timeout: Duration,
) -> Result<Option<FoundSlice>, CniError> {
    let (namespace, name, read_pod) = match lookup {
        Lookup::NotASlicePod => return Ok(None),
        Lookup::Known(slice) => return Ok(Some(FoundSlice::known(slice))),
        Lookup::ReadSlice { namespace, name } => (namespace, name, false),
        Lookup::ReadPod { namespace, name } => (namespace, name, true),
    };
    let Some(kubeconfig) = kubeconfig else {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "a kubeconfig is needed to read the slice",
        ));
    };
    let work = async {
        let client = client(kubeconfig).await?;
        let slice_name = if read_pod {
            match read_pod_annotation(&client, &namespace, &name).await? {
                None => return Ok(None),
                Some(slice) => match resolve_name(input, &slice)? {
                    Lookup::Known(s) => return Ok(Some(FoundSlice::known(s))),
                    _ => slice,
                },
            }
        } else {
            name
        };
        read_slice(&client, &namespace, &slice_name).await.map(Some)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the API server did not answer within {} ms",
                    timeout.as_millis()
                ),
            )
            .with_details(format!(
                "reading the slice of pod {namespace} (kubeconfig {})",
                kubeconfig.display()
            )))
        })
}

pub(crate) async fn client(kubeconfig: &Path) -> Result<Client, CniError> {
    let config_err = |e: &dyn std::fmt::Display| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!("kubeconfig {} is unusable", kubeconfig.display()),
        )
        .with_details(e.to_string())
    };
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| config_err(&e))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| config_err(&e))?;
    Client::try_from(config).map_err(|e| config_err(&e))
}

/// Transient failures (no connection, 5xx, 429) are "try again later" (11): the runtime retries
/// ADD. An answer that will not change by retrying (e.g. 403 from missing RBAC) is ours (103).
fn api_err(what: String, e: kube::Error) -> CniError {
    let code = match &e {
        kube::Error::Api(status) if status.code >= 500 || status.code == 429 => {
            code::TRY_AGAIN_LATER
        }
        kube::Error::Api(_) => code::API_ERROR,
        _ => code::TRY_AGAIN_LATER,
    };
    CniError::new(code, what).with_details(e.to_string())
}

async fn read_pod_annotation(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, CniError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .get_opt(name)
        .await
        .map_err(|e| api_err(format!("reading Pod {namespace}/{name} failed"), e))?;
    // A pod that is gone already cannot be a slice pod worth wiring; pass it through.
    Ok(pod
        .and_then(|p| p.metadata.annotations)
        .and_then(|a| a.get(SLICE_ANNOTATION).cloned()))
}

async fn read_slice(client: &Client, namespace: &str, name: &str) -> Result<FoundSlice, CniError> {
    let slices: Api<PortSlice> = Api::namespaced(client.clone(), namespace);
    let slice = slices
        .get_opt(name)
        .await
        .map_err(|e| api_err(format!("reading PortSlice {namespace}/{name} failed"), e))?
        .ok_or_else(|| {
            CniError::new(
                code::SLICE_NOT_FOUND,
                format!("PortSlice {namespace}/{name} does not exist"),
            )
            .with_details(format!(
                "create it, or fix the pod's {SLICE_ANNOTATION} annotation"
            ))
        })?;
    let range = slice.status.as_ref().and_then(|s| s.range);
    found_portslice(
        PortSliceRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: slice.metadata.uid,
        },
        &slice.spec.protocols,
        range,
        allowed_sources(&format!("{namespace}/{name}"), &slice.spec.allowed_sources)?,
    )
}
