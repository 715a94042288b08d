//! A small synchronous rtnetlink client for the netns thread: requests, dumps (retried when the
//! kernel flags them interrupted), and typed helpers for links, addresses, routes and rules.
//! Create it on the thread that entered the netns: the socket belongs to the netns it was
//! opened in.

use futures::StreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::packet_route::rule::RuleMessage;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::NetnsError;

/// Dumps interrupted by concurrent changes (NLM_F_DUMP_INTR) are retried this often
/// (containernetworking/plugins#1121 is what happens when they are not).
const DUMP_ATTEMPTS: usize = 5;

pub struct Nl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

fn io_err(what: &str, source: std::io::Error) -> NetnsError {
    NetnsError::Netlink {
        what: what.to_string(),
        source,
    }
}

/// Whether an error is the kernel's EEXIST / ENOENT / ESRCH (for idempotent adds and deletes).
pub fn is_errno(err: &NetnsError, errno: i32) -> bool {
    matches!(err, NetnsError::Netlink { source, .. } if source.raw_os_error() == Some(errno))
}

impl Nl {
    pub fn new() -> Result<Self, NetnsError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| io_err("starting the netlink runtime", e))?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(handle)
        });
        let handle = handle.map_err(|e| io_err("opening a netlink socket", e))?;
        Ok(Self { rt, handle })
    }

    /// One request; returns the inner messages, or the kernel's error. `dump_intr` is set when
    /// any reply carried NLM_F_DUMP_INTR.
    fn request_once(
        &self,
        payload: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), NetnsError> {
        let mut handle = self.handle.clone();
        let mut req = NetlinkMessage::from(payload);
        req.header.flags = flags;
        self.rt.block_on(async move {
            let mut stream = handle
                .request(req)
                .map_err(|e| io_err(what, std::io::Error::other(e.to_string())))?;
            let mut out = Vec::new();
            let mut intr = false;
            while let Some(msg) = stream.next().await {
                intr |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(io_err(what, e.to_io()));
                    }
                    _ => {}
                }
            }
            Ok((out, intr))
        })
    }

    fn dump(
        &self,
        payload: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetnsError> {
        for attempt in 1..=DUMP_ATTEMPTS {
            let (out, intr) =
                self.request_once(payload.clone(), NLM_F_REQUEST | NLM_F_DUMP, what)?;
            if !intr {
                return Ok(out);
            }
            tracing::debug!(what, attempt, "netlink dump interrupted, retrying");
        }
        Err(io_err(
            what,
            std::io::Error::other(format!("dump interrupted {DUMP_ATTEMPTS} times in a row")),
        ))
    }

    /// Creates (`NLM_F_EXCL`: EEXIST when present) or, with `replace`, creates-or-replaces.
    pub fn add(
        &self,
        payload: RouteNetlinkMessage,
        replace: bool,
        what: &str,
    ) -> Result<(), NetnsError> {
        let flags = NLM_F_REQUEST
            | NLM_F_ACK
            | NLM_F_CREATE
            | if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
        self.request_once(payload, flags, what).map(drop)
    }

    pub fn del(&self, payload: RouteNetlinkMessage, what: &str) -> Result<(), NetnsError> {
        self.request_once(payload, NLM_F_REQUEST | NLM_F_ACK, what)
            .map(drop)
    }

    pub fn links(&self) -> Result<Vec<LinkMessage>, NetnsError> {
        let out = self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "listing interfaces",
        )?;
        Ok(out
            .into_iter()
            .filter_map(|m| {
                if let RouteNetlinkMessage::NewLink(l) = m {
                    Some(l)
                } else {
                    None
                }
            })
            .collect())
    }

    /// The interface named `name`: its index and, for a veth whose peer lives in another netns,
    /// the peer's index there (IFLA_LINK, meaningful only with IFLA_LINK_NETNSID: without it the
    /// index is one of *this* netns and says nothing about the node).
    pub fn link_by_name(&self, name: &str) -> Result<(u32, Option<u32>), NetnsError> {
        for link in self.links()? {
            let is_it = link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name));
            if is_it {
                let peer = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Link(i) => Some(*i),
                    _ => None,
                });
                let elsewhere = link
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
                return Ok((link.header.index, peer.filter(|_| elsewhere)));
            }
        }
        Err(NetnsError::NoInterface(name.to_string()))
    }

    pub fn addresses_v4(&self) -> Result<Vec<AddressMessage>, NetnsError> {
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        let out = self.dump(RouteNetlinkMessage::GetAddress(req), "listing addresses")?;
        Ok(out
            .into_iter()
            .filter_map(|m| {
                if let RouteNetlinkMessage::NewAddress(a) = m {
                    Some(a)
                } else {
                    None
                }
            })
            .filter(|a| a.header.family == AddressFamily::Inet)
            .collect())
    }

    pub fn routes_v4(&self) -> Result<Vec<RouteMessage>, NetnsError> {
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let out = self.dump(RouteNetlinkMessage::GetRoute(req), "listing routes")?;
        Ok(out
            .into_iter()
            .filter_map(|m| {
                if let RouteNetlinkMessage::NewRoute(r) = m {
                    Some(r)
                } else {
                    None
                }
            })
            .filter(|r| r.header.address_family == AddressFamily::Inet)
            .collect())
    }

    pub fn rules_v4(&self) -> Result<Vec<RuleMessage>, NetnsError> {
        let mut req = RuleMessage::default();
        req.header.family = AddressFamily::Inet;
        let out = self.dump(RouteNetlinkMessage::GetRule(req), "listing policy rules")?;
        Ok(out
            .into_iter()
            .filter_map(|m| {
                if let RouteNetlinkMessage::NewRule(r) = m {
                    Some(r)
                } else {
                    None
                }
            })
            .filter(|r| r.header.family == AddressFamily::Inet)
            .collect())
    }
}

/// The IPv4 address and prefix of an address message.
pub fn address_of(a: &AddressMessage) -> Option<(std::net::Ipv4Addr, u8)> {
    a.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Local(std::net::IpAddr::V4(ip))
        | AddressAttribute::Address(std::net::IpAddr::V4(ip)) => Some((*ip, a.header.prefix_len)),
        _ => None,
    })
}
