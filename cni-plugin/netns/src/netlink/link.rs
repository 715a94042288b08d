//! Links: finding the pod interface and its veth peer.

use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};

use super::Nl;
use crate::NetnsError;

/// An interface and, for a veth whose peer lives in another netns, the peer's index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    /// IFLA_LINK, meaningful only with IFLA_LINK_NETNSID: without it the index is one of *this*
    /// netns and says nothing about the node.
    pub peer_index: Option<u32>,
}

impl Nl {
    /// The interface named `name`.
    pub fn link_by_name(&self, name: &str) -> Result<Link, NetnsError> {
        let links = self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "listing interfaces",
            |m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            },
        )?;
        let link = links
            .iter()
            .find(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
            })
            .ok_or_else(|| NetnsError::NoInterface(name.to_string()))?;
        let peer = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        });
        let elsewhere = link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        Ok(Link {
            index: link.header.index,
            peer_index: peer.filter(|_| elsewhere),
        })
    }
}
