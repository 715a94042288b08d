//! IPv4 addresses on interfaces.

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::Nl;
use crate::NetnsError;

/// An address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl Address {
    fn to_message(self) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = self.prefix;
        m.header.index = self.ifindex;
        m.header.scope = AddressScope::Universe;
        m.attributes
            .push(AddressAttribute::Local(IpAddr::V4(self.ip)));
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V4(self.ip)));
        m
    }

    fn from_message(m: &AddressMessage) -> Option<Self> {
        let ip = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        })?;
        Some(Self {
            ifindex: m.header.index,
            ip,
            prefix: m.header.prefix_len,
        })
    }
}

impl Nl {
    pub fn addresses_v4(&self) -> Result<Vec<Address>, NetnsError> {
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        self.dump(
            RouteNetlinkMessage::GetAddress(req),
            "listing addresses",
            |m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.family == AddressFamily::Inet => {
                    Address::from_message(&a)
                }
                _ => None,
            },
        )
    }

    /// Adds `a` (EEXIST when it is there: see [`super::ignore_exists`]).
    pub fn add_address(&self, a: Address, what: &str) -> Result<(), NetnsError> {
        self.add(RouteNetlinkMessage::NewAddress(a.to_message()), false, what)
    }

    pub fn del_address(&self, a: Address, what: &str) -> Result<(), NetnsError> {
        self.del(RouteNetlinkMessage::DelAddress(a.to_message()), what)
    }
}
