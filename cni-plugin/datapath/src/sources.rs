//! Allowed-source lists of slice pods: the CIDR type of the API and its `src_allow` trie keys.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use aya::maps::lpm_trie::Key;
use portslice_netns::Ipv4Cidr;

use super::abi;

/// One entry of a slice pod's allowed-source list: `10.0.0.0/8`, `203.0.113.7/32`, `fd00::/8`.
/// Host bits are cleared on construction, so two lists compare equal when they mean the same.
/// An entry of one family never matches a source of the other: the family is part of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceCidr {
    addr: IpAddr,
    prefix: u8,
}

impl SourceCidr {
    /// `None` when the prefix is longer than the address. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d/(96+n)`) is the IPv4 CIDR `a.b.c.d/n`.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let (addr, prefix) = match addr {
            IpAddr::V6(a) if prefix >= 96 && a.to_ipv4_mapped().is_some() => {
                (IpAddr::V4(a.to_ipv4_mapped()?), prefix - 96)
            }
            a => (a, prefix),
        };
        let c = match addr {
            IpAddr::V4(a) if prefix <= 32 => Self {
                addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
                prefix,
            },
            IpAddr::V6(a) if prefix <= 128 => Self {
                addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
                prefix,
            },
            _ => return None,
        };
        Some(c)
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.prefix).is_some_and(|c| c == *self)
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl From<Ipv4Cidr> for SourceCidr {
    fn from(c: Ipv4Cidr) -> Self {
        Self {
            addr: IpAddr::V4(c.network()),
            prefix: c.prefix,
        }
    }
}

impl fmt::Display for SourceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a CIDR like 203.0.113.0/24 or 2001:db8::/32")]
pub struct SourceCidrError(pub String);

impl FromStr for SourceCidr {
    type Err = SourceCidrError;

    /// `addr/prefix`, or a bare address (a single host: /32 or /128).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SourceCidrError(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.parse::<IpAddr>().map_err(|_| bad())?,
                Some(p.parse::<u8>().map_err(|_| bad())?),
            ),
            None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let prefix = prefix.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        Self::new(addr, prefix).ok_or_else(bad)
    }
}

/// The trie key of `c` in the list of the pod with host ifindex `pod`.
pub fn key_of(pod: u32, c: &SourceCidr) -> Key<abi::SrcData> {
    let mut data = abi::SrcData {
        pod,
        ..Default::default()
    };
    match c.addr {
        IpAddr::V4(a) => {
            data.family = abi::SRC_FAMILY_V4;
            data.addr[..4].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            data.family = abi::SRC_FAMILY_V6;
            data.addr = a.octets();
        }
    }
    Key::new(64 + u32::from(c.prefix), data)
}

/// The CIDR a trie key holds, with its pod; `None` for a key this build did not write.
pub fn cidr_of(key: &Key<abi::SrcData>) -> Option<(u32, SourceCidr)> {
    let data = key.data();
    let prefix = u8::try_from(key.prefix_len().checked_sub(64)?).ok()?;
    let addr = match data.family {
        abi::SRC_FAMILY_V4 => {
            let mut o = [0u8; 4];
            o.copy_from_slice(&data.addr[..4]);
            IpAddr::V4(Ipv4Addr::from(o))
        }
        abi::SRC_FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(data.addr)),
        _ => return None,
    };
    Some((data.pod, SourceCidr::new(addr, prefix)?))
}

/// A list as stored: sorted, without duplicates, at most [`abi::MAX_SOURCES_PER_POD`] entries.
pub fn normalize(list: &[SourceCidr]) -> Result<Vec<SourceCidr>, String> {
    let mut v = list.to_vec();
    v.sort_unstable();
    v.dedup();
    if v.len() > abi::MAX_SOURCES_PER_POD {
        return Err(format!(
            "{} allowed sources; a slice pod may have at most {} (aggregate them into wider prefixes)",
            v.len(),
            abi::MAX_SOURCES_PER_POD
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> SourceCidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_normalizes_and_refuses() {
        assert_eq!(c("10.1.2.3/16").to_string(), "10.1.0.0/16");
        assert_eq!(c("198.18.0.2").to_string(), "198.18.0.2/32");
        assert_eq!(c("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert_eq!(c("::ffff:10.0.0.0/104"), c("10.0.0.0/8"));
        assert!(c("10.0.0.0/8").contains("10.200.1.1".parse().unwrap()));
        assert!(!c("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(!c("::/0").contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "fd00::/129", "x/8", "10.0.0.0/", ""] {
            assert!(bad.parse::<SourceCidr>().is_err(), "{bad}");
        }
        let v4: Ipv4Cidr = "10.9.8.7/24".parse().unwrap();
        assert_eq!(SourceCidr::from(v4), c("10.9.8.0/24"));
    }

    #[test]
    fn keys_round_trip_and_keep_families_apart() {
        for s in [
            "0.0.0.0/0",
            "198.18.0.2/32",
            "10.0.0.0/8",
            "::/0",
            "2001:db8::/32",
        ] {
            let k = key_of(7, &c(s));
            assert_eq!(cidr_of(&k), Some((7, c(s))), "{s}");
        }
        // The family word is inside the matched prefix even for /0 entries.
        assert_eq!(key_of(7, &c("0.0.0.0/0")).prefix_len(), 64);
        assert_ne!(
            key_of(7, &c("0.0.0.0/0")).data().family,
            key_of(7, &c("::/0")).data().family
        );
        assert_eq!(key_of(7, &c("1.2.3.4/32")).data().addr[..4], [1, 2, 3, 4]);
    }

    #[test]
    fn lists_are_sorted_deduplicated_and_bounded() {
        let l = normalize(&[c("10.0.0.0/8"), c("1.0.0.0/8"), c("10.1.0.0/8")]).unwrap();
        assert_eq!(l, vec![c("1.0.0.0/8"), c("10.0.0.0/8")]);
        let many: Vec<_> = (0..=abi::MAX_SOURCES_PER_POD as u32)
            .map(|i| SourceCidr::new(IpAddr::V4(Ipv4Addr::from(i << 8)), 24).unwrap())
            .collect();
        assert!(normalize(&many).is_err());
        assert!(normalize(&many[1..]).is_ok());
    }
}
