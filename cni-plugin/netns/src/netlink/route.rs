//! Routes of either family: read (with the kernel's message kept for exact deletes and
//! replaces) and added.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};

use super::{Listed, Nl, address_family};
use crate::plan::TABLE_MAIN;
use crate::{Family, NetnsError};

/// A route as the parts we act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub destination: Option<IpAddr>,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub pref_source: Option<IpAddr>,
    /// Who added it (`proto`): ours carry [`crate::plan::PROTO_PORTSLICE`].
    pub protocol: u8,
    pub unicast: bool,
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

impl Route {
    /// The main table's default route.
    pub fn is_default(&self) -> bool {
        self.table == TABLE_MAIN && self.prefix == 0 && self.unicast
    }

    fn from_message(m: &RouteMessage) -> Self {
        let addr = |pick: fn(&RouteAttribute) -> Option<&RouteAddress>| {
            m.attributes.iter().find_map(|a| pick(a).and_then(ip_of))
        };
        let table = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(m.header.table));
        Self {
            table,
            destination: addr(|a| match a {
                RouteAttribute::Destination(d) => Some(d),
                _ => None,
            }),
            prefix: m.header.destination_prefix_length,
            gateway: addr(|a| match a {
                RouteAttribute::Gateway(g) => Some(g),
                _ => None,
            }),
            pref_source: addr(|a| match a {
                RouteAttribute::PrefSource(s) => Some(s),
                _ => None,
            }),
            protocol: u8::from(m.header.protocol),
            unicast: m.header.kind == RouteType::Unicast,
        }
    }
}

/// A route to add to the main table. Every address is of one family (that of `destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewRoute {
    pub destination: IpAddr,
    pub prefix: u8,
    pub gateway: IpAddr,
    pub pref_source: IpAddr,
    pub oif: u32,
    pub protocol: u8,
}

pub type ListedRoute = Listed<Route, RouteMessage>;

fn mixed(r: &NewRoute) -> NetnsError {
    NetnsError::Netlink {
        what: format!("building the route {r:?}"),
        source: std::io::Error::other("addresses of two families in one route"),
    }
}

impl NewRoute {
    fn to_message(self) -> Result<RouteMessage, NetnsError> {
        let protocol = RouteProtocol::Other(self.protocol);
        match (self.destination, self.gateway, self.pref_source) {
            (IpAddr::V4(d), IpAddr::V4(g), IpAddr::V4(s)) => {
                Ok(RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d, self.prefix)
                    .gateway(g)
                    .pref_source(s)
                    .output_interface(self.oif)
                    .protocol(protocol)
                    .build())
            }
            (IpAddr::V6(d), IpAddr::V6(g), IpAddr::V6(s)) => {
                Ok(RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d, self.prefix)
                    .gateway(g)
                    .pref_source(s)
                    .output_interface(self.oif)
                    .protocol(protocol)
                    .build())
            }
            _ => Err(mixed(&self)),
        }
    }
}

impl Nl {
    /// Every route of `family`, of every table.
    pub fn routes(&self, family: Family) -> Result<Vec<ListedRoute>, NetnsError> {
        let want = address_family(family);
        let mut req = RouteMessage::default();
        req.header.address_family = want;
        self.dump(
            RouteNetlinkMessage::GetRoute(req),
            "listing routes",
            |m| match m {
                RouteNetlinkMessage::NewRoute(r) if r.header.address_family == want => {
                    Some(Listed {
                        item: Route::from_message(&r),
                        raw: r,
                    })
                }
                _ => None,
            },
        )
    }

    /// Adds `r` (EEXIST when there: see [`super::ignore_exists`]).
    pub fn add_route(&self, r: &NewRoute, what: &str) -> Result<(), NetnsError> {
        self.add(RouteNetlinkMessage::NewRoute(r.to_message()?), false, what)
    }

    /// Replaces a listed route by itself with another preferred source (`None`: none).
    pub fn set_pref_source(
        &self,
        r: &ListedRoute,
        source: Option<IpAddr>,
        what: &str,
    ) -> Result<(), NetnsError> {
        let mut msg = r.raw.clone();
        msg.attributes
            .retain(|a| !matches!(a, RouteAttribute::PrefSource(_)));
        if let Some(ip) = source {
            msg.attributes
                .push(RouteAttribute::PrefSource(route_address(ip)));
        }
        self.add(RouteNetlinkMessage::NewRoute(msg), true, what)
    }

    pub fn del_route(&self, r: &ListedRoute, what: &str) -> Result<(), NetnsError> {
        self.del(RouteNetlinkMessage::DelRoute(r.raw.clone()), what)
    }
}
