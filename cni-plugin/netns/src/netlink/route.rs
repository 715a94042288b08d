//! IPv4 routes: read (with the kernel's message kept for exact deletes and replaces) and added.

use std::net::Ipv4Addr;

use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{Listed, Nl};
use crate::NetnsError;
use crate::plan::TABLE_MAIN;

/// A route as the parts we act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub destination: Option<Ipv4Addr>,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub pref_source: Option<Ipv4Addr>,
    /// Who added it (`proto`): ours carry [`crate::plan::PROTO_PORTSLICE`].
    pub protocol: u8,
    pub unicast: bool,
}

impl Route {
    /// The main table's default route.
    pub fn is_default(&self) -> bool {
        self.table == TABLE_MAIN && self.prefix == 0 && self.unicast
    }

    fn from_message(m: &RouteMessage) -> Self {
        let addr = |pick: fn(&RouteAttribute) -> Option<&RouteAddress>| {
            m.attributes.iter().find_map(|a| match pick(a) {
                Some(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })
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

/// A route to add to the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewRoute {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub pref_source: Ipv4Addr,
    pub oif: u32,
    pub protocol: u8,
}

pub type ListedRoute = Listed<Route, RouteMessage>;

impl Nl {
    pub fn routes_v4(&self) -> Result<Vec<ListedRoute>, NetnsError> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        self.dump(
            RouteNetlinkMessage::GetRoute(req),
            "listing routes",
            |m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.address_family == AddressFamily::Inet =>
                {
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
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.destination, r.prefix)
            .gateway(r.gateway)
            .pref_source(r.pref_source)
            .output_interface(r.oif)
            .protocol(RouteProtocol::Other(r.protocol))
            .build();
        self.add(RouteNetlinkMessage::NewRoute(msg), false, what)
    }

    /// Replaces a listed route by itself with another preferred source (`None`: none).
    pub fn set_pref_source(
        &self,
        r: &ListedRoute,
        source: Option<Ipv4Addr>,
        what: &str,
    ) -> Result<(), NetnsError> {
        let mut msg = r.raw.clone();
        msg.attributes
            .retain(|a| !matches!(a, RouteAttribute::PrefSource(_)));
        if let Some(ip) = source {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::Inet(ip)));
        }
        self.add(RouteNetlinkMessage::NewRoute(msg), true, what)
    }

    pub fn del_route(&self, r: &ListedRoute, what: &str) -> Result<(), NetnsError> {
        self.del(RouteNetlinkMessage::DelRoute(r.raw.clone()), what)
    }
}
