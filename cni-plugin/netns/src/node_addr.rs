//! The node's shared addresses: at most one per family, either family alone. A slice owns its
//! ports on every one of them. One rule for the daemon's `--node-ip` and the plugin's `nodeIP`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses slice pods share with the node: an IPv4 address, an IPv6 address, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAddrError {
    #[error("no node address given: name the node's IPv4 address, its IPv6 address, or both")]
    Empty,
    #[error("two node addresses of one family ({0} and {1}): give at most one IPv4 and one IPv6")]
    SameFamily(IpAddr, IpAddr),
    #[error("{0} cannot be shared with pods: {1}")]
    Unshareable(IpAddr, &'static str),
}

impl NodeAddrs {
    /// Only an IPv4 address (what every configuration before dual stack named).
    pub fn v4(ip: Ipv4Addr) -> Self {
        Self {
            v4: Some(ip),
            v6: None,
        }
    }

    /// Validates `addrs`: at least one, at most one per family, each an address packets from
    /// elsewhere can be sent to and pods can hold. An IPv4-mapped IPv6 address is its IPv4 form.
    pub fn new(addrs: impl IntoIterator<Item = IpAddr>) -> Result<Self, NodeAddrError> {
        let mut out = Self { v4: None, v6: None };
        for addr in addrs {
            let addr = addr.to_canonical();
            if let Some(why) = unshareable(addr) {
                return Err(NodeAddrError::Unshareable(addr, why));
            }
            match addr {
                IpAddr::V4(a) => match out.v4 {
                    Some(old) => return Err(NodeAddrError::SameFamily(old.into(), addr)),
                    None => out.v4 = Some(a),
                },
                IpAddr::V6(a) => match out.v6 {
                    Some(old) => return Err(NodeAddrError::SameFamily(old.into(), addr)),
                    None => out.v6 = Some(a),
                },
            }
        }
        if out.v4.is_none() && out.v6.is_none() {
            return Err(NodeAddrError::Empty);
        }
        Ok(out)
    }

    /// The addresses, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }

    /// Whether `ip` is one of them (an IPv4-mapped IPv6 address counts as its IPv4 form).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.v4 == Some(a),
            IpAddr::V6(a) => self.v6 == Some(a),
        }
    }
}

fn unshareable(addr: IpAddr) -> Option<&'static str> {
    if addr.is_unspecified() {
        return Some("it is the unspecified address");
    }
    if addr.is_loopback() {
        return Some("it is a loopback address");
    }
    if addr.is_multicast() {
        return Some("it is a multicast address");
    }
    match addr {
        // Link-local addresses belong to one link; the pods' veths are other links.
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("it is link-local"),
        IpAddr::V4(a) if a.is_broadcast() => Some("it is the broadcast address"),
        _ => None,
    }
}

impl fmt::Display for NodeAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.iter().map(|a| a.to_string()).collect();
        f.write_str(&all.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn either_family_alone_or_both() {
        let v4 = NodeAddrs::new([ip("198.18.0.1")]).unwrap();
        assert_eq!(v4, NodeAddrs::v4("198.18.0.1".parse().unwrap()));
        let v6 = NodeAddrs::new([ip("2001:2::1")]).unwrap();
        assert_eq!((v6.v4, v6.v6), (None, Some("2001:2::1".parse().unwrap())));
        let both = NodeAddrs::new([ip("2001:2::1"), ip("198.18.0.1")]).unwrap();
        assert_eq!(both.to_string(), "198.18.0.1,2001:2::1");
        assert!(both.contains(ip("::ffff:198.18.0.1")));
        assert!(!both.contains(ip("2001:2::2")));
        // A mapped address is the IPv4 one.
        let mapped = NodeAddrs::new([ip("::ffff:198.18.0.1")]).unwrap();
        assert_eq!(mapped, v4);
    }

    #[test]
    fn refuses_what_cannot_be_shared_or_is_ambiguous() {
        assert_eq!(NodeAddrs::new([]), Err(NodeAddrError::Empty));
        assert!(matches!(
            NodeAddrs::new([ip("198.18.0.1"), ip("198.18.0.2")]),
            Err(NodeAddrError::SameFamily(..))
        ));
        assert!(matches!(
            NodeAddrs::new([ip("2001:2::1"), ip("2001:2::2")]),
            Err(NodeAddrError::SameFamily(..))
        ));
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
        ] {
            assert!(
                matches!(
                    NodeAddrs::new([ip(bad)]),
                    Err(NodeAddrError::Unshareable(..))
                ),
                "{bad}"
            );
        }
    }
}
