//! Ports as PortSlice thinks of them: inclusive ranges, the protocols a slice owns, sets of
//! disjoint ranges (pools, `ip_local_reserved_ports`), the rules every pool obeys, and the node's
//! own ports that no slice may ever hold.
//!
//! The operator (which allocates from pools) and the node daemon (which reserves them on the host)
//! both take their pool through [`Pool::new`], so a pool one of them accepts the other accepts
//! too. Pure: no I/O and no Kubernetes types; the CRD's schema for [`PortRange`] and
//! [`Protocol`] is derived here with schemars.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod critical;
mod pool;
mod protocol;
mod range;
mod set;

pub use critical::{CriticalPort, DEFAULT_API_SERVER_PORT, DEFAULT_DAEMON_PORT, NodeCritical};
pub use pool::{DEFAULT_NODE_PORT_RANGE, FIRST_UNPRIVILEGED_PORT, Pool, PoolError};
pub use protocol::Protocol;
pub use range::{PortRange, PortRangeError, parse_list};
pub use set::RangeSet;
