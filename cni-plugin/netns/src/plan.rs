//! What a slice pod's netns must contain, as data: the policy rules and routes. Pure, so the
//! tricky parts (port ranges that touch 65535, rule order) are unit-tested without a kernel.

use std::net::Ipv4Addr;

use portslice_ports::PortRange;

use crate::Ipv4Cidr;

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

/// One `ip rule`, all of them `to <node IP>/32`.
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

/// The wiring of one slice pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodWiring {
    /// The pod interface (CNI_IFNAME).
    pub ifname: String,
    pub node_ip: Ipv4Addr,
    /// The primary plugin's address of the pod.
    pub private: Ipv4Cidr,
    /// Fallback gateway (from prevResult) when the netns has no default route.
    pub gateway: Option<Ipv4Addr>,
    pub cluster_cidrs: Vec<Ipv4Cidr>,
    pub range: PortRange,
}

impl PodWiring {
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

    /// `ip_local_port_range` for the pod: its slice.
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
        PodWiring {
            ifname: "eth0".into(),
            node_ip: Ipv4Addr::new(192, 0, 2, 10),
            private: "10.22.0.5/24".parse().unwrap(),
            gateway: None,
            cluster_cidrs: vec![],
            range: PortRange { start, end },
        }
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
