//! The ports processes of the calling thread's netns listen on, from sock_diag or
//! `/proc/net/{tcp,udp}[6]` (both follow the caller's netns). The node daemon warns about them
//! and the CNI plugin refuses a slice that would take one: steering runs before the socket
//! lookup, so a slice on a host listener's port would silently take its traffic.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portslice_ports::{PortRange, Protocol};

use crate::{NodeAddrs, sock_diag};

/// A listening TCP socket or a bound UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub protocol: Protocol,
    pub addr: IpAddr,
    pub port: u16,
}

impl Listener {
    /// Whether traffic to one of the node addresses reaches it: bound to a node address, to
    /// `0.0.0.0` when the node shares an IPv4 address, or to `::` (which hears IPv4 too unless
    /// the socket is IPv6-only, which `/proc/net` does not show: counted as hearing both). A
    /// listener on another address (loopback, docker's embedded DNS on 127.0.0.11, a second
    /// address) never sees what the datapath steers, which is only ever traffic to the node
    /// addresses.
    pub fn hears(&self, node: &NodeAddrs) -> bool {
        match self.addr {
            IpAddr::V4(a) if a.is_unspecified() => node.v4.is_some(),
            IpAddr::V6(a) if a.is_unspecified() => true,
            a => node.contains(a),
        }
    }
}

/// Local addresses and ports of listening TCP sockets (`tcp`) or bound UDP sockets in one table.
/// Addresses are hex in the kernel's byte order, one 32-bit word at a time.
pub fn parse(table: &str, tcp: bool) -> Vec<(IpAddr, u16)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let state = f.get(3)?;
            // 0A = TCP_LISTEN; UDP sockets are 07 (TCP_CLOSE) when merely bound.
            if tcp && *state != "0A" {
                return None;
            }
            let (addr, port) = local.rsplit_once(':')?;
            Some((parse_addr(addr)?, u16::from_str_radix(port, 16).ok()?))
        })
        .collect()
}

fn parse_addr(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    // Each word is in host order: its native bytes are the address bytes.
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Every listener of this netns, IPv4 and IPv6, sorted and deduplicated: from sock_diag (see
/// [`crate::sock_diag`] for why), else from `/proc/net`. A table neither can read (an
/// IPv6-less kernel) counts as empty.
pub fn host_listeners() -> Vec<Listener> {
    let mut out = Vec::new();
    for (file, protocol, tcp, v6) in [
        ("/proc/net/tcp", Protocol::TCP, true, false),
        ("/proc/net/tcp6", Protocol::TCP, true, true),
        ("/proc/net/udp", Protocol::UDP, false, false),
        ("/proc/net/udp6", Protocol::UDP, false, true),
    ] {
        let (proto, states) = if tcp {
            (libc::IPPROTO_TCP as u8, sock_diag::LISTEN)
        } else {
            (libc::IPPROTO_UDP as u8, sock_diag::ANY_STATE)
        };
        let found = match sock_diag::local_addrs(v6, proto, states) {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!(error = %e, file, "sock_diag unavailable; reading /proc");
                std::fs::read_to_string(file)
                    .map(|t| parse(&t, tcp))
                    .unwrap_or_default()
            }
        };
        out.extend(found.into_iter().map(|(addr, port)| Listener {
            protocol,
            addr,
            port,
        }));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The listeners among `listeners` that a slice of `range` over `protocols` would take from the
/// host on the node addresses `node` (a slice owns its ports on every one of them).
pub fn taken_by(
    listeners: &[Listener],
    range: &PortRange,
    protocols: &[Protocol],
    node: &NodeAddrs,
) -> Vec<Listener> {
    listeners
        .iter()
        .filter(|l| range.contains(l.port) && protocols.contains(&l.protocol) && l.hears(node))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    #[test]
    fn parses_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st\n   0: 00000000:9C40 00000000:0000 0A 0\n   1: 0100007F:0016 0100007F:C350 01 0\n   2: 0B00007F:9C59 00000000:0000 0A 0\n";
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let dns = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(parse(tcp, true), vec![(any, 40000), (dns, 40025)]);
        let udp = "  sl  local_address rem_address   st\n   0: 00000000:0035 00000000:0000 07 0\n";
        assert_eq!(parse(udp, false), vec![(any, 53)]);
        let tcp6 = "h\n 0: 00000000000000000000000000000000:9C41 00000000000000000000000000000000:0000 0A\n";
        assert_eq!(
            parse(tcp6, true),
            vec![(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 40001)]
        );
    }

    /// The kernel's own answer, for sockets this test opens (no root needed: sock_diag dumps the
    /// caller's netns to anyone): sock_diag and `/proc/net` both see each, and an established
    /// TCP connection is no listener.
    #[test]
    fn sock_diag_finds_the_listeners_proc_shows() {
        use std::net::{TcpListener, TcpStream, UdpSocket};
        let tcp4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp6 = TcpListener::bind("[::1]:0").unwrap();
        let udp4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp6 = UdpSocket::bind("[::1]:0").unwrap();
        let client = TcpStream::connect(tcp4.local_addr().unwrap()).unwrap();
        let want = [
            (Protocol::TCP, tcp4.local_addr().unwrap()),
            (Protocol::TCP, tcp6.local_addr().unwrap()),
            (Protocol::UDP, udp4.local_addr().unwrap()),
            (Protocol::UDP, udp6.local_addr().unwrap()),
        ];
        let found = host_listeners();
        for (protocol, a) in want {
            let l = Listener {
                protocol,
                addr: a.ip(),
                port: a.port(),
            };
            assert!(found.contains(&l), "{l:?} not in {found:?}");
        }
        let diag = sock_diag::local_addrs(false, libc::IPPROTO_TCP as u8, sock_diag::LISTEN)
            .expect("sock_diag answers");
        let proc = parse(&std::fs::read_to_string("/proc/net/tcp").unwrap(), true);
        let ours = (
            tcp4.local_addr().unwrap().ip(),
            tcp4.local_addr().unwrap().port(),
        );
        assert!(diag.contains(&ours) && proc.contains(&ours));
        let outgoing = client.local_addr().unwrap();
        assert!(
            !diag.contains(&(outgoing.ip(), outgoing.port())),
            "an established socket is no listener"
        );
    }

    fn l(protocol: Protocol, addr: &str, port: u16) -> Listener {
        Listener {
            protocol,
            addr: addr.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn a_slice_takes_only_listeners_of_its_ports_protocols_and_the_node_address() {
        let listeners = [
            l(Protocol::TCP, "0.0.0.0", 22),
            l(Protocol::UDP, "0.0.0.0", 5060),
            l(Protocol::TCP, "198.18.0.1", 5061),
            // Docker's embedded DNS on a kind node: never sees traffic to the node address.
            l(Protocol::TCP, "127.0.0.11", 5061),
            l(Protocol::TCP, "::ffff:198.18.0.1", 5060),
            l(Protocol::UDP, "::", 5061),
            l(Protocol::UDP, "2001:2::1", 5060),
        ];
        let r = PortRange {
            start: 5060,
            end: 5061,
        };
        let n = NodeAddrs::v4(N);
        assert_eq!(
            taken_by(&listeners, &r, &[Protocol::UDP], &n),
            vec![listeners[1], listeners[5]]
        );
        assert_eq!(
            taken_by(&listeners, &r, &[Protocol::TCP], &n),
            vec![listeners[2], listeners[4]]
        );
        // A dual-stack node also loses its IPv6 listeners on the node's IPv6 address; an
        // IPv6-only node keeps its IPv4 wildcard listeners (nothing steers IPv4 there).
        let dual = NodeAddrs::new([IpAddr::V4(N), "2001:2::1".parse().unwrap()]).unwrap();
        assert_eq!(
            taken_by(&listeners, &r, &[Protocol::UDP], &dual),
            vec![listeners[1], listeners[5], listeners[6]]
        );
        let v6 = NodeAddrs::new(["2001:2::1".parse().unwrap()]).unwrap();
        assert_eq!(
            taken_by(&listeners, &r, &[Protocol::UDP], &v6),
            vec![listeners[5], listeners[6]]
        );
        assert!(taken_by(&listeners, &r, &[Protocol::TCP], &v6).is_empty());
    }

    #[test]
    fn this_netns_can_be_read() {
        let mine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = mine.local_addr().unwrap().port();
        assert!(host_listeners().contains(&l(Protocol::TCP, "127.0.0.1", port)));
    }
}
