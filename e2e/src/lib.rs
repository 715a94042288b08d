//! PortSlice end-to-end suite support. The scenario itself is `tests/e2e.rs`; this crate holds
//! what it is made of, split so the pure parts are unit-tested without a cluster:
//! - [`settings`]: what the suite runs against (kubeconfig, node/remote addresses, how to reach
//!   the remote host and the node), read from the environment;
//! - [`manifests`]: the PortSlices and workloads a user would apply (pure);
//! - [`metrics`]: metric names a dashboard queries and a /metrics page exports (pure);
//! - [`probe`]: parsing what the agent answers (pure);
//! - [`report`]: named checks with honest outcomes (pass, fail, or not run and why);
//! - [`shell`]: running helm/kubectl/agent commands with timeouts.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod dns;
pub mod manifests;
pub mod metrics;
pub mod probe;
pub mod report;
pub mod settings;
pub mod shell;
