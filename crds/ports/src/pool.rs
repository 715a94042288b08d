//! The pool: the ports the operator hands out for `size` requests and every node reserves so the
//! host never takes them as ephemeral ports.
//!
//! A pool that touches the NodePort range or ports below 1024 is refused, not silently cut: the
//! operator, the node daemon and the chart's render-time check give the same answer, and the
//! message says what to change. Exact-port reservations (`spec.ports`) are not pool ports and are
//! governed by the reservations policy instead.
use crate::{NodeCritical, PortRange, RangeSet};

/// Ports below this are privileged: never in a pool.
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;
/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: PortRange = PortRange {
    start: 30000,
    end: 32767,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("the pool is empty: give at least one port range, e.g. 40000-59999")]
    Empty,
    #[error(
        "pool range {range} overlaps the NodePort range {node_ports}: kube-proxy owns those ports \
         on every node; move the pool (e.g. {suggestion})"
    )]
    NodePorts {
        range: PortRange,
        node_ports: PortRange,
        suggestion: String,
    },
    #[error(
        "pool range {range} reaches below {FIRST_UNPRIVILEGED_PORT}: privileged ports are only \
         ever held by exact reservations (spec.ports), never handed out from the pool"
    )]
    Privileged { range: PortRange },
}

/// A validated pool: merged, disjoint ranges clear of the NodePort range and privileged ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool(RangeSet);

impl Pool {
    /// Checks every range against the rules and merges them.
    pub fn new(
        ranges: impl IntoIterator<Item = PortRange>,
        node_ports: PortRange,
    ) -> Result<Self, PoolError> {
        let set = RangeSet::new(ranges);
        if set.is_empty() {
            return Err(PoolError::Empty);
        }
        for &range in set.ranges() {
            if range.start < FIRST_UNPRIVILEGED_PORT {
                return Err(PoolError::Privileged { range });
            }
            if range.overlaps(&node_ports) {
                let rest = RangeSet::new([range]).subtract(&RangeSet::new([node_ports]));
                return Err(PoolError::NodePorts {
                    range,
                    node_ports,
                    suggestion: if rest.is_empty() {
                        "40000-59999".into()
                    } else {
                        rest.to_string()
                    },
                });
            }
        }
        Ok(Self(set))
    }

    pub fn ranges(&self) -> &[PortRange] {
        self.0.ranges()
    }

    pub fn as_set(&self) -> &RangeSet {
        &self.0
    }

    pub fn port_count(&self) -> u32 {
        self.0.port_count()
    }

    /// Number of ports of `range` inside the pool.
    pub fn count_in(&self, range: &PortRange) -> u32 {
        self.0.count_in(range)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.contains(port)
    }

    /// The ports `size` requests are handed from: the pool less the node-critical ports inside
    /// it (a pool such as 1024-29999 holds etcd's and the API server's ports; they stay reserved
    /// on the host, harmlessly, but are never handed to a slice).
    pub fn allocatable(&self, critical: &NodeCritical) -> RangeSet {
        self.0.subtract(&critical.as_set())
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_list;

    fn pool(s: &str) -> Result<Pool, PoolError> {
        Pool::new(parse_list(s).unwrap(), DEFAULT_NODE_PORT_RANGE)
    }

    #[test]
    fn accepts_and_merges_clean_ranges() {
        let p = pool("50000-50010,40000-40010,40005-40020,40021-40030").unwrap();
        assert_eq!(p.to_string(), "40000-40030,50000-50010");
        assert_eq!(p.port_count(), 31 + 11);
        assert_eq!(pool("1024-29999,32768-65535").unwrap().port_count(), 61744);
    }

    #[test]
    fn refuses_node_ports_saying_what_would_fit() {
        let e = pool("31000-40000").unwrap_err();
        assert!(matches!(e, PoolError::NodePorts { .. }), "{e}");
        assert!(e.to_string().contains("32768-40000"), "{e}");
        let e = pool("30000-32767").unwrap_err();
        assert!(e.to_string().contains("e.g. 40000-59999"), "{e}");
        // Another NodePort range moves the rule with it.
        let custom = PortRange {
            start: 20000,
            end: 20999,
        };
        assert!(Pool::new(parse_list("30000-32767").unwrap(), custom).is_ok());
        assert!(Pool::new(parse_list("20500-21500").unwrap(), custom).is_err());
    }

    #[test]
    fn node_critical_ports_inside_a_pool_are_never_allocatable() {
        let p = pool("1024-29999").unwrap();
        let a = p.allocatable(&NodeCritical::default());
        for port in [2379, 2380, 6443, 9465, 10250] {
            assert!(p.contains(port) && !a.contains(port), "{port}");
        }
        assert_eq!(a.port_count(), p.port_count() - 2 - 1 - 1 - 4);
    }

    #[test]
    fn refuses_privileged_ports_and_empty_pools() {
        assert!(matches!(
            pool("80-443,40000-40010"),
            Err(PoolError::Privileged { .. })
        ));
        assert!(matches!(
            pool("1023-2000"),
            Err(PoolError::Privileged { .. })
        ));
        assert!(pool("1024-2000").is_ok());
        assert_eq!(pool(""), Err(PoolError::Empty));
    }
}
