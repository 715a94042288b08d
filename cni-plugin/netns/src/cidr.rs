//! Minimal CIDR types (std has no prefix type): [`Ipv4Cidr`], [`Ipv6Cidr`], and [`IpCidr`] for
//! lists that hold both families (a dual-stack cluster's CIDRs).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// Bits of an address of this family (the prefix length of a host route).
    pub fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// The unspecified address (`0.0.0.0`, `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Self::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// `ip -4` / `ip -6` in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// An IPv4 address with a prefix length, e.g. `10.96.0.0/12` or `10.1.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then_some(Self { addr, prefix })
    }

    /// The network address (host bits cleared), as routes want it.
    pub fn network(&self) -> Ipv4Addr {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(u32::from(self.addr) & mask)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Ipv4Cidr {
            addr: ip,
            prefix: self.prefix,
        }
        .network()
            == self.network()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a CIDR like 10.96.0.0/12 or fd00:10:96::/112")]
pub struct CidrError(pub String);

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Ipv4Cidr::new(addr, prefix).ok_or_else(bad)
    }
}

/// An IPv6 address with a prefix length, e.g. `fd00:10:96::/112` or `fd00:244::5/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Cidr {
    pub addr: Ipv6Addr,
    pub prefix: u8,
}

impl Ipv6Cidr {
    pub fn new(addr: Ipv6Addr, prefix: u8) -> Option<Self> {
        (prefix <= 128).then_some(Self { addr, prefix })
    }

    /// The network address (host bits cleared), as routes want it.
    pub fn network(&self) -> Ipv6Addr {
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        Ipv6Addr::from(u128::from(self.addr) & mask)
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        Ipv6Cidr {
            addr: ip,
            prefix: self.prefix,
        }
        .network()
            == self.network()
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv6Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Ipv6Cidr::new(addr, prefix).ok_or_else(bad)
    }
}

/// A CIDR of either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpCidr {
    V4(Ipv4Cidr),
    V6(Ipv6Cidr),
}

impl IpCidr {
    pub fn family(&self) -> Family {
        Family::of(self.addr())
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            Self::V4(c) => IpAddr::V4(c.addr),
            Self::V6(c) => IpAddr::V6(c.addr),
        }
    }

    pub fn prefix(&self) -> u8 {
        match self {
            Self::V4(c) => c.prefix,
            Self::V6(c) => c.prefix,
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self {
            Self::V4(c) => IpAddr::V4(c.network()),
            Self::V6(c) => IpAddr::V6(c.network()),
        }
    }

    pub fn is_ipv6(&self) -> bool {
        matches!(self, Self::V6(_))
    }
}

impl From<Ipv4Cidr> for IpCidr {
    fn from(c: Ipv4Cidr) -> Self {
        Self::V4(c)
    }
}

impl From<Ipv6Cidr> for IpCidr {
    fn from(c: Ipv6Cidr) -> Self {
        Self::V6(c)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(c) => c.fmt(f),
            Self::V6(c) => c.fmt(f),
        }
    }
}

impl FromStr for IpCidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse().map(Self::V6)
        } else {
            s.parse().map(Self::V4)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_parses_and_masks() {
        let c: Ipv6Cidr = "fd00:244::5/64".parse().unwrap();
        assert_eq!(c.network(), "fd00:244::".parse::<Ipv6Addr>().unwrap());
        assert!(c.contains("fd00:244::ffff".parse().unwrap()));
        assert!(!c.contains("fd00:245::1".parse().unwrap()));
        assert_eq!(
            "::/0".parse::<Ipv6Cidr>().unwrap().network(),
            Ipv6Addr::UNSPECIFIED
        );
        for bad in ["fd00::", "fd00::/129", "10.0.0.0/8", "x/8"] {
            assert!(bad.parse::<Ipv6Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn either_family_parses_by_its_form() {
        let v4: IpCidr = "10.96.0.0/12".parse().unwrap();
        let v6: IpCidr = "fd00:10:96::/112".parse().unwrap();
        assert!(!v4.is_ipv6() && v6.is_ipv6());
        assert_eq!(v4.to_string(), "10.96.0.0/12");
        assert_eq!(v6.prefix(), 112);
        assert!("10.0.0.0".parse::<IpCidr>().is_err());
    }

    #[test]
    fn parses_and_masks() {
        let c: Ipv4Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 1, 0, 0));
        assert!(c.contains(Ipv4Addr::new(10, 1, 200, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 2, 0, 1)));
        assert_eq!(
            "0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().network(),
            Ipv4Addr::UNSPECIFIED
        );
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/8", "x/8"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }
}
