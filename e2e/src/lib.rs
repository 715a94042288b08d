//! PortSlice end-to-end suite support. The scenario itself is `tests/e2e.rs`; this crate holds
//! what it is made of, split so the pure parts are unit-tested without a cluster:
//! - [`settings`]: what the suite runs against (kubeconfig, node/remote addresses, how to reach
//!   the remote host and the node), read from the environment;
//! - [`manifests`]: the PortSlices and workloads a user would apply (pure);
//! - [`probe`]: parsing what the agent answers (pure);
//! - [`report`]: named checks with honest outcomes (pass, fail, or not run and why);
//! - [`shell`]: running helm/kubectl/agent commands with timeouts.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod manifests;
pub mod probe;
pub mod report;
pub mod settings;
pub mod shell;

#[cfg(test)]
mod chart_tests {
    use std::path::Path;

    fn repo() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new(".."))
    }

    /// The chart ships the generated CRD; `make crds` copies it. A stale copy would install an
    /// API that differs from the one the operator is built against.
    #[test]
    fn chart_crd_is_byte_identical_to_the_generated_one() {
        let generated =
            std::fs::read(repo().join("crds/portslice.io_portslices.yaml")).expect("generated CRD");
        let shipped =
            std::fs::read(repo().join("charts/portslice/crds/portslice.io_portslices.yaml"))
                .expect("chart CRD (run `make crds`)");
        assert!(
            generated == shipped,
            "charts/portslice/crds is stale: run `make crds`"
        );
    }
}
