//! Finding the pod's slice for ADD and CHECK: the pure plan, then the node daemon's cache, then
//! the API server when needed.

use crate::cni::config::PluginConfig;
use crate::cni::env::CniEnv;
use crate::cni::error::{CniError, code};
use crate::slice_source::node_cache::{self, Decision};
use crate::slice_source::{FoundSlice, Lookup, PlanInput, PodIdentity, kube_lookup, plan};

pub fn find_slice(env: &CniEnv, conf: &PluginConfig) -> Result<Option<FoundSlice>, CniError> {
    let pod = PodIdentity::from_args(&env.args);
    let input = PlanInput {
        args: &env.args,
        pod: &pod,
        annotations: conf.pod_annotations.as_ref(),
        static_slices: &conf.slices,
        network_slice: conf.network_slice.as_deref(),
        has_kubeconfig: conf.kubeconfig.is_some(),
    };
    let lookup = plan(&input)?;
    tracing::debug!(pod = %pod.display(), ?lookup, "slice lookup");
    match lookup {
        Lookup::NotASlicePod => Ok(None),
        Lookup::Known(s) => Ok(Some(FoundSlice::known(s))),
        needs_api => {
            // The node daemon's cache first: no API round trip (nor client set-up) when it knows.
            if let Some(request) = node_cache::request_for(&needs_api)
                && let Some(answer) =
                    node_cache::ask(&node_cache::socket_path(&conf.state_dir), &request)
            {
                match node_cache::decide(&needs_api, &input, &answer)? {
                    Decision::Found(found) => return Ok(Some(*found)),
                    Decision::NotASlicePod => return Ok(None),
                    Decision::AskTheApiServer => {}
                }
            }
            // A runtime only for this call: the API client is async, the rest of the plugin is not.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    CniError::new(code::IO_FAILURE, "starting the API client runtime failed")
                        .with_details(e.to_string())
                })?;
            rt.block_on(kube_lookup::resolve(
                needs_api,
                &input,
                conf.kubeconfig.as_deref(),
                conf.api_timeout,
            ))
        }
    }
}
