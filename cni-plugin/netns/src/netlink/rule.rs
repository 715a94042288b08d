//! Policy rules (`ip rule`, `ip -6 rule`).

use std::net::IpAddr;

use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};

use super::{Listed, Nl, address_family};
use crate::{Family, NetnsError};

/// The protocol number the kernel gives the rules it makes itself.
pub const PROTO_KERNEL: u8 = 2;

/// A rule as the parts we set and compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The rule list it is in: IPv4 and IPv6 rules are separate.
    pub family: Family,
    pub priority: u32,
    pub table: u32,
    /// Who added it (`proto`).
    pub protocol: u8,
    /// `to <ip>/32` (`/128`), if the rule matches a destination (of [`Self::family`]).
    pub destination: Option<IpAddr>,
    /// `ipproto`.
    pub ip_proto: Option<u8>,
    /// `dport <start>-<end>`.
    pub dport: Option<(u16, u16)>,
    /// `iif <name>`.
    pub iif: Option<String>,
}

impl Rule {
    fn to_message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = address_family(self.family);
        m.header.action = RuleAction::ToTable;
        m.header.table = u8::try_from(self.table).unwrap_or(0);
        m.attributes.push(RuleAttribute::Table(self.table));
        m.attributes.push(RuleAttribute::Priority(self.priority));
        m.attributes
            .push(RuleAttribute::Protocol(match self.protocol {
                PROTO_KERNEL => RouteProtocol::Kernel,
                p => RouteProtocol::Other(p),
            }));
        if let Some(ip) = self.destination {
            m.header.dst_len = Family::of(ip).bits();
            m.attributes.push(RuleAttribute::Destination(ip));
        }
        if let Some(p) = self.ip_proto {
            m.attributes
                .push(RuleAttribute::IpProtocol(IpProtocol::from(p)));
        }
        if let Some((start, end)) = self.dport {
            m.attributes
                .push(RuleAttribute::DestinationPortRange(RulePortRange {
                    start,
                    end,
                }));
        }
        if let Some(iif) = &self.iif {
            m.attributes.push(RuleAttribute::Iifname(iif.clone()));
        }
        m
    }

    fn from_message(r: &RuleMessage) -> Self {
        let mut p = Rule {
            family: if r.header.family == AddressFamily::Inet6 {
                Family::V6
            } else {
                Family::V4
            },
            priority: 0,
            table: u32::from(r.header.table),
            protocol: 0,
            destination: None,
            ip_proto: None,
            dport: None,
            iif: None,
        };
        for a in &r.attributes {
            match a {
                RuleAttribute::Priority(v) => p.priority = *v,
                RuleAttribute::Table(t) => p.table = *t,
                RuleAttribute::Protocol(v) => p.protocol = u8::from(*v),
                RuleAttribute::Destination(ip) => p.destination = Some(*ip),
                RuleAttribute::IpProtocol(v) => p.ip_proto = u8::try_from(i32::from(*v)).ok(),
                RuleAttribute::DestinationPortRange(pr) => p.dport = Some((pr.start, pr.end)),
                RuleAttribute::Iifname(n) => p.iif = Some(n.clone()),
                _ => {}
            }
        }
        p
    }
}

pub type ListedRule = Listed<Rule, RuleMessage>;

impl Nl {
    /// Every rule of `family`.
    pub fn rules(&self, family: Family) -> Result<Vec<ListedRule>, NetnsError> {
        let want = address_family(family);
        let mut req = RuleMessage::default();
        req.header.family = want;
        self.dump(
            RouteNetlinkMessage::GetRule(req),
            "listing policy rules",
            |m| match m {
                RouteNetlinkMessage::NewRule(r) if r.header.family == want => Some(Listed {
                    item: Rule::from_message(&r),
                    raw: r,
                }),
                _ => None,
            },
        )
    }

    /// Adds `r` (EEXIST when there: see [`super::ignore_exists`]).
    pub fn add_rule(&self, r: &Rule, what: &str) -> Result<(), NetnsError> {
        self.add(RouteNetlinkMessage::NewRule(r.to_message()), false, what)
    }

    pub fn del_rule(&self, r: &ListedRule, what: &str) -> Result<(), NetnsError> {
        self.del(RouteNetlinkMessage::DelRule(r.raw.clone()), what)
    }
}
