//! Addresses on interfaces, IPv4 and IPv6.

use std::net::IpAddr;

use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};

use super::{Nl, address_family};
use crate::{Family, NetnsError};

/// An address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub prefix: u8,
}

impl Address {
    fn to_message(self) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = address_family(Family::of(self.ip));
        m.header.prefix_len = self.prefix;
        m.header.index = self.ifindex;
        m.header.scope = AddressScope::Universe;
        if self.ip.is_ipv6() {
            // No duplicate address detection: the node address is the node's on purpose, and a
            // tentative address could not be bound (or be a route's source) for a second or two.
            // No prefix route either: IPv6 gives even a /128 an on-link route in the main table
            // (IPv4 gives a /32 none), which would beat the route via the gateway and make the
            // pod look for the node address on its own link.
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes.push(AddressAttribute::Flags(
                AddressFlags::Nodad | AddressFlags::Noprefixroute,
            ));
        } else {
            m.attributes.push(AddressAttribute::Local(self.ip));
        }
        m.attributes.push(AddressAttribute::Address(self.ip));
        m
    }

    fn from_message(m: &AddressMessage) -> Option<Self> {
        // IPv4 names the interface's own address in IFA_LOCAL (IFA_ADDRESS is the peer on
        // point-to-point links); IPv6 only in IFA_ADDRESS unless a peer is set.
        let ip = m
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })?;
        Some(Self {
            ifindex: m.header.index,
            ip,
            prefix: m.header.prefix_len,
        })
    }
}

impl Nl {
    /// Every address of `family` in the netns.
    pub fn addresses(&self, family: Family) -> Result<Vec<Address>, NetnsError> {
        let want = address_family(family);
        let mut req = AddressMessage::default();
        req.header.family = want;
        self.dump(
            RouteNetlinkMessage::GetAddress(req),
            "listing addresses",
            |m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.family == want => {
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
