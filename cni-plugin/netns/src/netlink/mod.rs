//! A small synchronous rtnetlink client for the netns thread: requests and dumps (retried when
//! the kernel flags them interrupted), with typed operations per object in [`link`], [`address`],
//! [`route`] and [`rule`]. The rest of the crate never sees a netlink message. Create the client
//! on the thread that entered the netns: the socket belongs to the netns it was opened in.

pub mod address;
pub mod link;
pub mod route;
pub mod rule;

use futures::StreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{Family, NetnsError};

/// The netlink family of an address family.
fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

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

    /// A dump, keeping the replies `pick` accepts.
    fn dump<T>(
        &self,
        payload: RouteNetlinkMessage,
        what: &str,
        pick: impl Fn(RouteNetlinkMessage) -> Option<T>,
    ) -> Result<Vec<T>, NetnsError> {
        for attempt in 1..=DUMP_ATTEMPTS {
            let (out, intr) =
                self.request_once(payload.clone(), NLM_F_REQUEST | NLM_F_DUMP, what)?;
            if !intr {
                return Ok(out.into_iter().filter_map(&pick).collect());
            }
            tracing::debug!(what, attempt, "netlink dump interrupted, retrying");
        }
        Err(io_err(
            what,
            std::io::Error::other(format!("dump interrupted {DUMP_ATTEMPTS} times in a row")),
        ))
    }

    /// Creates (`NLM_F_EXCL`: EEXIST when present) or, with `replace`, creates-or-replaces.
    fn add(
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

    fn del(&self, payload: RouteNetlinkMessage, what: &str) -> Result<(), NetnsError> {
        self.request_once(payload, NLM_F_REQUEST | NLM_F_ACK, what)
            .map(drop)
    }
}

/// Ok when the kernel said the thing is already there (EEXIST): for idempotent adds.
pub fn ignore_exists(r: Result<(), NetnsError>) -> Result<(), NetnsError> {
    match r {
        Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Ok when the kernel said the thing is not there (ENOENT, ESRCH, EADDRNOTAVAIL): for
/// idempotent deletes.
pub fn ignore_missing(r: Result<(), NetnsError>) -> Result<(), NetnsError> {
    match r {
        Err(e)
            if is_errno(&e, libc::ENOENT)
                || is_errno(&e, libc::ESRCH)
                || is_errno(&e, libc::EADDRNOTAVAIL) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// An object as a dump returned it: the typed view, and the kernel's message for an exact
/// delete or replace.
#[derive(Debug, Clone)]
pub struct Listed<T, M> {
    pub item: T,
    raw: M,
}

impl<T, M> std::ops::Deref for Listed<T, M> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.item
    }
}
