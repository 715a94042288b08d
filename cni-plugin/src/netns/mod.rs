//! Work inside a pod's network namespace: the node address, routes, policy rules and sysctls.
//!
//! A netns belongs to a *thread*, so everything here runs on a dedicated OS thread that entered
//! the pod's netns ([`thread::in_netns`]), never on a tokio worker; netlink sockets opened there and
//! `/proc/sys/net` files opened there belong to the pod's netns.

pub mod nl;
pub mod plan;
pub mod sysctl;
pub mod thread;
pub mod wiring;

/// Errors from netns work; each says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The netns path does not exist (any more): DEL treats this as "nothing to do".
    #[error("network namespace {0} does not exist")]
    Gone(String),
    #[error("entering network namespace {path}: {source}")]
    Enter {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the netns worker thread failed: {0}")]
    Thread(String),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sysctl {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {0:?} not found in the pod's network namespace")]
    NoInterface(String),
    #[error("the pod's network namespace has no default route and prevResult names no gateway")]
    NoGateway,
    /// CHECK: what is missing or different.
    #[error("wiring check failed: {}", .0.join("; "))]
    Check(Vec<String>),
    /// Undo after a failure also failed: the first error and what was left behind.
    #[error("{first}; undoing it also failed: {}", .undo.join("; "))]
    Undo {
        first: Box<NetnsError>,
        undo: Vec<String>,
    },
}
