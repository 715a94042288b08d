//! Work inside a network namespace: the node address, routes, policy rules and sysctls of a
//! slice pod, and the small primitives they are made of.
//!
//! - [`thread`]: a netns belongs to a *thread*, so everything here runs on a dedicated OS thread
//!   that entered the pod's netns, never on a tokio worker; netlink sockets and `/proc/sys/net`
//!   files opened there belong to that netns.
//! - [`sysctl`]: per-netns sysctls, addressed by path (interface names may contain dots).
//! - [`iface`]: interface names and indexes.
//! - [`node_addr`]: the node's shared addresses, one per family; [`cidr`]: prefixes of both.
//! - [`listeners`]: the ports this netns listens on (the node's host listeners).
//! - [`netlink`]: a synchronous rtnetlink client with typed operations on links, addresses,
//!   routes and rules; the only place that builds or reads netlink messages.
//! - [`plan`]: what a slice pod's netns must hold, as data (pure, unit-tested).
//! - [`wiring`]: applies, checks and removes that plan, undoing partial work on failure.
#![deny(rust_2018_idioms)]

pub mod cidr;
pub mod iface;
pub mod listeners;
pub mod netlink;
pub mod node_addr;
pub mod plan;
pub mod sock_diag;
pub mod sysctl;
pub mod thread;
pub mod wiring;

pub use cidr::{CidrError, Family, IpCidr, Ipv4Cidr, Ipv6Cidr};
pub use node_addr::{NodeAddrError, NodeAddrs};

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
    #[error("interface {0:?} not found")]
    NoInterface(String),
    #[error("the pod's network namespace has no {} default route and prevResult names no {} gateway", .0.name(), .0.name())]
    NoGateway(Family),
    /// CHECK: what is missing or different.
    #[error("wiring check failed: {}", .0.join("; "))]
    Check(Vec<String>),
    /// Removing the wiring (DEL, or undoing a failed ADD) left something behind.
    #[error("removing the wiring failed: {}", .0.join("; "))]
    Cleanup(Vec<String>),
    /// Undo after a failure also failed: the first error and what was left behind.
    #[error("{first}; undoing it also failed: {}", .undo.join("; "))]
    Undo {
        first: Box<NetnsError>,
        undo: Vec<String>,
    },
}
