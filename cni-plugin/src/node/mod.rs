//! What the CNI plugin and the node daemon share on the node itself, outside the datapath:
//! - [`lock`]: one CNI verb at a time per node (the second-sliver check, the map writes and the
//!   reserved ports are read-modify-write);
//! - [`reserved_ports`]: `net.ipv4.ip_local_reserved_ports`, so the host never takes a slice's
//!   port as its own ephemeral port (matrix row 10);
//! - [`pod_state`]: what ADD changed that DEL must put back (the pod's sysctls);
//! - [`refusal`]: the Event that tells a PortSlice this node refuses its pods.
pub mod lock;
pub mod pod_state;
pub mod refusal;
pub mod reserved_ports;
