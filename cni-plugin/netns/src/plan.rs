//! What a slice pod's netns must contain, as data: per address family the node address, routes
//! and policy rules, and the sysctls they share. Pure, so the tricky parts (port ranges that
//! touch 65535, rule order, which families a pod gets) are unit-tested without a kernel.

use std::net::IpAddr;

use portslice_ports::PortRange;

use crate::{Family, IpCidr, NodeAddrs};

/// Rule/route protocol number marking what PortSlice added (`ip rule` shows `proto 83`), so
/// cleanup and CHECK find exactly our entries.
pub const PROTO_PORTSLICE: u8 = 83;
/// Priority of the first PortSlice rule; ours sit between this and [`LOCAL_RULE_PRIORITY`].
pub const FIRST_RULE_PRIORITY: u32 = 100;
/// Where the `local` table rule moves to (from 0) so our rules come first.
pub const LOCAL_RULE_PRIORITY: u32 = 200;
/// The kernel's table ids.
pub const TABLE_LOCAL: u32 = 255;
pub const TABLE_MAIN: u32 = 254;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// One `ip rule`, all of them `to <node IP>/32` (`/128` for IPv6: the same rules in both lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleSpec {
    pub priority: u32,
    /// IP protocol (`ipproto`), if matched.
    pub ip_proto: Option<u8>,
    /// Destination port range (`dport`), if matched.
    pub dport: Option<(u16, u16)>,
    /// Match only packets received on the pod interface (`iif <ifname>`).
    pub iif_pod: bool,
    pub table: u32,
}

/// What one address family of a slice pod gets: the node address of that family beside the
/// pod's private one, and routes from them. Every address here is of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyWiring {
    pub node_ip: IpAddr,
    /// The primary plugin's address of the pod, of this family.
    pub private: IpCidr,
    /// Fallback gateway (from prevResult) when the netns has no default route of this family.
    pub gateway: Option<IpAddr>,
    /// The cluster's CIDRs of this family, reached from the private address.
    pub cluster_cidrs: Vec<IpCidr>,
}

impl FamilyWiring {
    pub fn family(&self) -> Family {
        Family::of(self.node_ip)
    }
}

/// A private address the primary plugin gave the pod, with its gateway if it named one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrivateAddress {
    pub cidr: IpCidr,
    pub gateway: Option<IpAddr>,
}

/// The wiring of one slice pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodWiring {
    /// The pod interface (CNI_IFNAME).
    pub ifname: String,
    pub range: PortRange,
    /// The IPv4 part: when the node has an IPv4 address and the pod an IPv4 private address.
    pub ipv4: Option<FamilyWiring>,
    /// The IPv6 part: when the node has an IPv6 address and the pod an IPv6 private address.
    pub ipv6: Option<FamilyWiring>,
}

impl PodWiring {
    /// The wiring of a pod with `privates` (in prevResult's order) on a node with `node`: for
    /// each family both have, the node address beside the pod's first private address of that
    /// family. A family only one side has is left alone: the pod keeps it as the primary plugin
    /// made it (an IPv4-only pod on a dual-stack node stays IPv4-only).
    pub fn new(
        ifname: &str,
        range: PortRange,
        node: &NodeAddrs,
        privates: &[PrivateAddress],
        cluster_cidrs: &[IpCidr],
    ) -> Self {
        let part = |node_ip: Option<IpAddr>| {
            let node_ip = node_ip?;
            let family = Family::of(node_ip);
            let p = privates.iter().find(|p| p.cidr.family() == family)?;
            Some(FamilyWiring {
                node_ip,
                private: p.cidr,
                gateway: p.gateway.filter(|g| Family::of(*g) == family),
                cluster_cidrs: cluster_cidrs
                    .iter()
                    .filter(|c| c.family() == family)
                    .copied()
                    .collect(),
            })
        };
        Self {
            ifname: ifname.to_string(),
            range,
            ipv4: part(node.v4.map(IpAddr::V4)),
            ipv6: part(node.v6.map(IpAddr::V6)),
        }
    }

    /// The families the pod gets, IPv4 first.
    pub fn families(&self) -> impl Iterator<Item = &FamilyWiring> + '_ {
        self.ipv4.iter().chain(self.ipv6.iter())
    }

    /// Whether the pod gets any node address at all (a pod with no family in common with the
    /// node cannot be a slice pod).
    pub fn is_empty(&self) -> bool {
        self.ipv4.is_none() && self.ipv6.is_none()
    }

    /// The rules that keep only the pod's own ports local, in priority order.
    ///
    /// First, whatever arrives *on* the pod interface for the node address is local: the
    /// datapath steers only the pod's own ports, echo replies and ICMP errors to it, and IP
    /// fragments carry no ports a fib rule could match (a steered fragmented datagram would
    /// otherwise be routed out again instead of reassembled, matrix row 11). Then, for what the
    /// pod itself sends, TCP and UDP to its own range stay local:
    /// `to <node IP> ipproto P dport <range> lookup local`. The kernel refuses a fib-rule port
    /// range that ends at 65535 (`fib_rule_port_range_valid`), so a range reaching 65535 is
    /// written the other way round: the ports below it go to `main`, then everything else of that
    /// protocol is local. Last, the rest of the node address leaves through the main table
    /// (hairpin to other slices, pod -> host).
    pub fn rules(&self) -> Vec<RuleSpec> {
        let mut rules = Vec::new();
        let mut priority = FIRST_RULE_PRIORITY;
        let mut push = |ip_proto, dport, iif_pod, table| {
            rules.push(RuleSpec {
                priority,
                ip_proto,
                dport,
                iif_pod,
                table,
            });
            priority += 1;
        };
        push(None, None, true, TABLE_LOCAL);
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let PortRange { start, end } = self.range;
            if end < u16::MAX {
                push(Some(proto), Some((start, end)), false, TABLE_LOCAL);
            } else {
                if start > 1 {
                    push(Some(proto), Some((1, start - 1)), false, TABLE_MAIN);
                }
                push(Some(proto), None, false, TABLE_LOCAL);
            }
        }
        push(None, None, false, TABLE_MAIN);
        rules
    }

    /// `ip_local_port_range` for the pod: its slice. The one sysctl governs IPv6 sockets too
    /// (Linux has no `net.ipv6.ip_local_port_range`; `inet_get_local_port_range` serves both).
    pub fn local_port_range(&self) -> String {
        format!("{} {}", self.range.start, self.range.end)
    }

    /// `ip_unprivileged_port_start`, when the slice holds ports the pod could not bind
    /// unprivileged. The kernel requires it to stay at or below the local port range's start.
    pub fn unprivileged_port_start(&self, current: u32) -> Option<u32> {
        let start = u32::from(self.range.start);
        (start < current).then_some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wiring(start: u16, end: u16) -> PodWiring {
        PodWiring::new(
            "eth0",
            PortRange { start, end },
            &NodeAddrs::v4("192.0.2.10".parse().unwrap()),
            &[private("10.22.0.5/24", None)],
            &[],
        )
    }

    fn private(cidr: &str, gateway: Option<&str>) -> PrivateAddress {
        PrivateAddress {
            cidr: cidr.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pod_gets_the_families_it_shares_with_the_node() {
        let range = PortRange {
            start: 40000,
            end: 40099,
        };
        let dual = NodeAddrs::new([ip("198.18.0.1"), ip("2001:2::1")]).unwrap();
        let cluster: Vec<IpCidr> = ["10.96.0.0/12", "fd00:10:96::/112"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let both = [
            private("10.22.0.5/24", Some("10.22.0.1")),
            private("fd00:22::5/64", Some("fd00:22::1")),
        ];
        let w = PodWiring::new("eth0", range, &dual, &both, &cluster);
        let v4 = w.ipv4.as_ref().unwrap();
        let v6 = w.ipv6.as_ref().unwrap();
        assert_eq!(v4.node_ip, ip("198.18.0.1"));
        assert_eq!(v4.gateway, Some(ip("10.22.0.1")));
        assert_eq!(v4.cluster_cidrs, vec![cluster[0]]);
        assert_eq!(v6.node_ip, ip("2001:2::1"));
        assert_eq!(v6.private.to_string(), "fd00:22::5/64");
        assert_eq!(v6.cluster_cidrs, vec![cluster[1]]);
        assert_eq!(
            w.families().map(FamilyWiring::family).collect::<Vec<_>>(),
            vec![Family::V4, Family::V6]
        );
        // An IPv6-only pod on a dual-stack node gets IPv6 only; an IPv4-only pod IPv4 only.
        let w = PodWiring::new("eth0", range, &dual, &both[1..], &cluster);
        assert!(w.ipv4.is_none() && w.ipv6.is_some());
        let w = PodWiring::new("eth0", range, &dual, &both[..1], &cluster);
        assert!(w.ipv4.is_some() && w.ipv6.is_none());
        // An IPv6-only node and an IPv4-only pod share nothing.
        let v6_node = NodeAddrs::new([ip("2001:2::1")]).unwrap();
        assert!(PodWiring::new("eth0", range, &v6_node, &both[..1], &cluster).is_empty());
        // A gateway of the other family is no gateway.
        let odd = [private("fd00:22::5/64", Some("10.22.0.1"))];
        let w = PodWiring::new("eth0", range, &v6_node, &odd, &[]);
        assert_eq!(w.ipv6.unwrap().gateway, None);
    }

    #[test]
    fn ordinary_range_keeps_its_ports_local_then_sends_the_rest_out() {
        let rules = wiring(40000, 40999).rules();
        let summary: Vec<_> = rules
            .iter()
            .map(|r| (r.priority, r.ip_proto, r.dport, r.iif_pod, r.table))
            .collect();
        assert_eq!(
            summary,
            vec![
                (100, None, None, true, TABLE_LOCAL),
                (
                    101,
                    Some(IPPROTO_TCP),
                    Some((40000, 40999)),
                    false,
                    TABLE_LOCAL
                ),
                (
                    102,
                    Some(IPPROTO_UDP),
                    Some((40000, 40999)),
                    false,
                    TABLE_LOCAL
                ),
                (103, None, None, false, TABLE_MAIN),
            ]
        );
        assert!(rules.iter().all(|r| r.priority < LOCAL_RULE_PRIORITY));
    }

    #[test]
    fn ranges_ending_at_65535_never_produce_a_port_range_ending_there() {
        for (start, end) in [(60000, 65535), (65535, 65535), (1, 65535)] {
            let rules = wiring(start, end).rules();
            assert!(
                rules
                    .iter()
                    .all(|r| r.dport.is_none_or(|(a, b)| a >= 1 && b < 65535 && a <= b))
            );
            let tcp: Vec<_> = rules
                .iter()
                .filter(|r| r.ip_proto == Some(IPPROTO_TCP))
                .collect();
            // The last TCP rule makes the rest local; any earlier one sends lower ports out.
            assert_eq!(tcp.last().unwrap().table, TABLE_LOCAL);
            if start > 1 {
                assert_eq!(tcp[0].dport, Some((1, start - 1)));
                assert_eq!(tcp[0].table, TABLE_MAIN);
            }
        }
    }

    #[test]
    fn sysctls_follow_the_slice() {
        let w = wiring(53, 53);
        assert_eq!(w.local_port_range(), "53 53");
        assert_eq!(w.unprivileged_port_start(1024), Some(53));
        assert_eq!(wiring(40000, 40010).unprivileged_port_start(1024), None);
    }

    /// What the rules decide for a packet the pod sends to `<node IP>:port`: the first matching
    /// rule's table, as the kernel walks them.
    fn table_for(rules: &[RuleSpec], proto: u8, port: u16) -> u32 {
        rules
            .iter()
            .filter(|r| !r.iif_pod)
            .find(|r| {
                r.ip_proto.is_none_or(|p| p == proto)
                    && r.dport.is_none_or(|(a, b)| a <= port && port <= b)
            })
            .map_or(TABLE_LOCAL, |r| r.table)
    }

    proptest::proptest! {
        #[test]
        fn exactly_the_own_ports_resolve_local(start in 1u16..=65535, len in 0u16..3000, port in 1u16..=65535) {
            let end = start.saturating_add(len);
            let w = wiring(start, end);
            let rules = w.rules();
            proptest::prop_assert!(rules.iter().all(|r| r.dport.is_none_or(|(a, b)| a >= 1 && a <= b && b < 65535)));
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                let local = table_for(&rules, proto, port) == TABLE_LOCAL;
                proptest::prop_assert_eq!(local, start <= port && port <= end, "port {} of {}-{}", port, start, end);
            }
        }
    }
}
