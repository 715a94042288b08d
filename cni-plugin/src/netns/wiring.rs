//! Applying, checking and removing a slice pod's wiring. Every function here runs on the thread
//! that entered the pod's netns (see [`super::thread::in_netns`]).

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};

use super::nl::{Nl, address_of, is_errno};
use super::plan::{
    FIRST_RULE_PRIORITY, LOCAL_RULE_PRIORITY, PROTO_PORTSLICE, PodWiring, RuleSpec, TABLE_LOCAL,
    TABLE_MAIN,
};
use super::{NetnsError, sysctl};

/// What ADD learnt inside the pod, for the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodLink {
    /// Index of the pod interface inside the pod.
    pub ifindex: u32,
    /// Index of its veth peer in the node's netns (IFLA_LINK).
    pub peer_ifindex: Option<u32>,
}

/// Finds the pod interface and its veth peer (for pods without a slice, too).
pub fn pod_link(ifname: &str) -> Result<PodLink, NetnsError> {
    let nl = Nl::new()?;
    let (ifindex, peer_ifindex) = nl.link_by_name(ifname)?;
    Ok(PodLink {
        ifindex,
        peer_ifindex,
    })
}

/// What ADD changed that cleanup cannot find by itself: the sysctls' previous values.
#[derive(Debug, Clone)]
pub struct Applied {
    pub link: PodLink,
    saved: Vec<(String, String)>,
}

/// Wires the pod. On failure, removes what it added and restores the sysctls before returning
/// the error: ADD leaves nothing behind. The returned [`Applied`] lets a later failure of ADD
/// (the datapath) undo it all with [`undo`].
pub fn apply(w: &PodWiring) -> Result<Applied, NetnsError> {
    let nl = Nl::new()?;
    let (ifindex, peer_ifindex) = nl.link_by_name(&w.ifname)?;
    let saved = [
        sysctl::UNPRIVILEGED_PORT_START.to_string(),
        sysctl::LOCAL_PORT_RANGE.to_string(),
        arp_announce_key(&w.ifname),
    ]
    .into_iter()
    .map(|k| sysctl::read(&k).map(|v| (k, v)))
    .collect::<Result<Vec<_>, _>>()?;
    match apply_steps(&nl, w, ifindex, &saved) {
        Ok(()) => Ok(Applied {
            link: PodLink {
                ifindex,
                peer_ifindex,
            },
            saved,
        }),
        Err(first) => {
            let undo = undo_with(&nl, w, ifindex, &saved);
            if undo.is_empty() {
                Err(first)
            } else {
                Err(NetnsError::Undo {
                    first: Box::new(first),
                    undo,
                })
            }
        }
    }
}

/// Undoes a successful [`apply`] (ADD failed later).
pub fn undo(w: &PodWiring, applied: &Applied) -> Result<(), NetnsError> {
    let nl = Nl::new()?;
    let errors = undo_with(&nl, w, applied.link.ifindex, &applied.saved);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(NetnsError::Check(errors))
    }
}

fn undo_with(nl: &Nl, w: &PodWiring, ifindex: u32, saved: &[(String, String)]) -> Vec<String> {
    let mut errors = cleanup(nl, w.node_ip, ifindex);
    // Restore in reverse order: the port range first, as the kernel checks the unprivileged
    // start against it.
    for (key, value) in saved.iter().rev() {
        if let Err(e) = sysctl::write(key, value) {
            errors.push(e.to_string());
        }
    }
    errors
}

fn apply_steps(
    nl: &Nl,
    w: &PodWiring,
    ifindex: u32,
    saved: &[(String, String)],
) -> Result<(), NetnsError> {
    // Sysctls: the unprivileged start must never be above the port range's start, so lower it
    // before moving the range down.
    let current_unpriv = saved
        .iter()
        .find(|(k, _)| k == sysctl::UNPRIVILEGED_PORT_START)
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(1024);
    if let Some(start) = w.unprivileged_port_start(current_unpriv) {
        sysctl::write(sysctl::UNPRIVILEGED_PORT_START, &start.to_string())?;
    }
    sysctl::write(sysctl::LOCAL_PORT_RANGE, &w.local_port_range())?;
    // With two addresses on the interface, ARP requests must not name the node address as
    // sender: the node drops them as martian (its own address) on any L3 interface without
    // accept_local, e.g. a bridge. 2 = the address of the target's subnet, the private one.
    sysctl::write(&arp_announce_key(&w.ifname), "2")?;

    // The node address /32, after the private one so the private stays the primary.
    tolerate_exists(nl.add(
        RouteNetlinkMessage::NewAddress(address_msg(w.node_ip, ifindex)),
        false,
        "adding the node address",
    ))?;

    // Default route: same gateway, now with `src <node IP>`.
    let routes = nl.routes_v4()?;
    let gateway = match default_route(&routes) {
        Some(r) => {
            let gw = gateway_of(r);
            let mut r = r.clone();
            r.attributes
                .retain(|a| !matches!(a, RouteAttribute::PrefSource(_)));
            r.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::Inet(w.node_ip)));
            nl.add(
                RouteNetlinkMessage::NewRoute(r),
                true,
                "setting src <node IP> on the default route",
            )?;
            gw.or(w.gateway).ok_or(NetnsError::NoGateway)?
        }
        None => {
            let gw = w.gateway.ok_or(NetnsError::NoGateway)?;
            let r = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(gw)
                .pref_source(w.node_ip)
                .output_interface(ifindex)
                .protocol(RouteProtocol::Other(PROTO_PORTSLICE))
                .build();
            nl.add(
                RouteNetlinkMessage::NewRoute(r),
                false,
                "adding the default route",
            )?;
            gw
        }
    };

    // The node address /32 in the main table, via the same gateway: what `to <node IP> lookup
    // main` finds for ports that are not the pod's, and the route the reference plugins' CHECK
    // looks up for every address of their interface (our /32 has no prefix route otherwise).
    let r = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(w.node_ip, 32)
        .gateway(gateway)
        .pref_source(w.node_ip)
        .output_interface(ifindex)
        .protocol(RouteProtocol::Other(PROTO_PORTSLICE))
        .build();
    tolerate_exists(nl.add(
        RouteNetlinkMessage::NewRoute(r),
        false,
        "adding the route to the node address",
    ))?;

    // Cluster CIDRs keep the private address as source.
    for cidr in &w.cluster_cidrs {
        let r = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(cidr.network(), cidr.prefix)
            .gateway(gateway)
            .pref_source(w.private.addr)
            .output_interface(ifindex)
            .protocol(RouteProtocol::Other(PROTO_PORTSLICE))
            .build();
        let res = nl.add(
            RouteNetlinkMessage::NewRoute(r),
            false,
            &format!("adding the route to {cidr}"),
        );
        if res.as_ref().is_err_and(|e| is_errno(e, libc::EEXIST)) {
            // The primary plugin routes it already; its source is the private address anyway
            // (the first primary address of the interface).
            tracing::debug!(%cidr, "cluster CIDR already routed");
            continue;
        }
        res?;
    }

    // Our rules first, then the `local` table moved behind them: added at its new place before
    // it leaves priority 0, so there is no instant without it.
    for spec in w.rules() {
        tolerate_exists(nl.add(
            RouteNetlinkMessage::NewRule(rule_msg(&spec, w.node_ip, &w.ifname)),
            false,
            &format!("adding policy rule {spec:?}"),
        ))?;
    }
    tolerate_exists(nl.add(
        RouteNetlinkMessage::NewRule(local_rule_msg(LOCAL_RULE_PRIORITY, true)),
        false,
        "moving the local table rule",
    ))?;
    for rule in nl.rules_v4()? {
        let p = parse_rule(&rule);
        if p.table == TABLE_LOCAL
            && p.priority < FIRST_RULE_PRIORITY
            && p.ip_proto.is_none()
            && p.dst.is_none()
        {
            nl.del(
                RouteNetlinkMessage::DelRule(rule),
                "removing the local table rule at priority 0",
            )?;
        }
    }
    Ok(())
}

/// Removes everything PortSlice added in the pod (DEL, and undo after a failed ADD). Collects
/// errors and carries on. Leaves the sysctls: the caller restores them when it knows the old
/// values.
pub fn cleanup(nl: &Nl, node_ip: Ipv4Addr, ifindex: u32) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |r: Result<(), NetnsError>| {
        if let Err(e) = r {
            errors.push(e.to_string());
        }
    };
    // The local table rule goes back to priority 0 before ours go, so there is no instant
    // without it.
    note(tolerate_exists(nl.add(
        RouteNetlinkMessage::NewRule(local_rule_msg(0, false)),
        false,
        "restoring the local table rule",
    )));
    match nl.rules_v4() {
        Ok(rules) => {
            for rule in rules
                .into_iter()
                .filter(|r| parse_rule(r).proto == PROTO_PORTSLICE)
            {
                note(tolerate_missing(nl.del(
                    RouteNetlinkMessage::DelRule(rule),
                    "removing a PortSlice policy rule",
                )));
            }
        }
        Err(e) => note(Err(e)),
    }
    match nl.routes_v4() {
        Ok(routes) => {
            for r in routes {
                if u8::from(r.header.protocol) == PROTO_PORTSLICE {
                    note(tolerate_missing(nl.del(
                        RouteNetlinkMessage::DelRoute(r),
                        "removing a PortSlice route",
                    )));
                } else if is_default(&r) && pref_source(&r) == Some(node_ip) {
                    let mut r = r;
                    r.attributes
                        .retain(|a| !matches!(a, RouteAttribute::PrefSource(_)));
                    note(nl.add(
                        RouteNetlinkMessage::NewRoute(r),
                        true,
                        "restoring the default route",
                    ));
                }
            }
        }
        Err(e) => note(Err(e)),
    }
    note(tolerate_missing(nl.del(
        RouteNetlinkMessage::DelAddress(address_msg(node_ip, ifindex)),
        "removing the node address",
    )));
    errors
}

/// DEL inside the pod: finds the interface and cleans up. A missing interface means the primary
/// plugin already removed it: nothing to do.
pub fn teardown(ifname: &str, node_ip: Ipv4Addr) -> Result<(), NetnsError> {
    let nl = Nl::new()?;
    let ifindex = match nl.link_by_name(ifname) {
        Ok((i, _)) => i,
        Err(NetnsError::NoInterface(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let errors = cleanup(&nl, node_ip, ifindex);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(NetnsError::Check(errors))
    }
}

/// CHECK inside the pod: every piece of the wiring is in place. Returns the pod link so the
/// caller can check the datapath entry for its peer.
pub fn check(w: &PodWiring) -> Result<PodLink, NetnsError> {
    let nl = Nl::new()?;
    let (ifindex, peer_ifindex) = nl.link_by_name(&w.ifname)?;
    let mut problems = Vec::new();
    let has_addr = nl
        .addresses_v4()?
        .iter()
        .any(|a| a.header.index == ifindex && address_of(a) == Some((w.node_ip, 32)));
    if !has_addr {
        problems.push(format!(
            "node address {}/32 missing on {}",
            w.node_ip, w.ifname
        ));
    }
    let routes = nl.routes_v4()?;
    match default_route(&routes) {
        Some(r) if pref_source(r) == Some(w.node_ip) => {}
        Some(_) => problems.push(format!("default route lacks src {}", w.node_ip)),
        None => problems.push("no default route".into()),
    }
    let node_routed = routes.iter().any(|r| {
        table_of(r) == TABLE_MAIN
            && r.header.destination_prefix_length == 32
            && destination(r) == Some(w.node_ip)
    });
    if !node_routed {
        problems.push(format!(
            "no main-table route to the node address {}",
            w.node_ip
        ));
    }
    for cidr in &w.cluster_cidrs {
        let routed = routes.iter().any(|r| {
            r.header.destination_prefix_length == cidr.prefix
                && destination(r) == Some(cidr.network())
        });
        if !routed {
            problems.push(format!("no route to cluster CIDR {cidr}"));
        }
    }
    let rules: Vec<ParsedRule> = nl.rules_v4()?.iter().map(parse_rule).collect();
    for spec in w.rules() {
        let want = ParsedRule::from_spec(&spec, w.node_ip, &w.ifname);
        if !rules.contains(&want) {
            problems.push(format!("policy rule missing: {spec:?}"));
        }
    }
    let local_early = rules
        .iter()
        .any(|r| r.table == TABLE_LOCAL && r.priority < FIRST_RULE_PRIORITY && r.dst.is_none());
    if local_early {
        problems.push("the local table rule is still ahead of the PortSlice rules".into());
    }
    if !rules
        .iter()
        .any(|r| r.table == TABLE_LOCAL && r.dst.is_none())
    {
        problems.push("no local table rule at all".into());
    }
    match sysctl::read(&arp_announce_key(&w.ifname)) {
        Ok(v) if v == "2" => {}
        Ok(v) => problems.push(format!("arp_announce on {} is {v}, want 2", w.ifname)),
        Err(e) => problems.push(e.to_string()),
    }
    match sysctl::read(sysctl::LOCAL_PORT_RANGE) {
        Ok(v) if v == w.local_port_range() => {}
        Ok(v) => problems.push(format!(
            "ip_local_port_range is {v:?}, want {:?}",
            w.local_port_range()
        )),
        Err(e) => problems.push(e.to_string()),
    }
    if problems.is_empty() {
        Ok(PodLink {
            ifindex,
            peer_ifindex,
        })
    } else {
        Err(NetnsError::Check(problems))
    }
}

fn arp_announce_key(ifname: &str) -> String {
    format!("net.ipv4.conf.{ifname}.arp_announce")
}

fn tolerate_exists(r: Result<(), NetnsError>) -> Result<(), NetnsError> {
    match r {
        Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
        other => other,
    }
}

fn tolerate_missing(r: Result<(), NetnsError>) -> Result<(), NetnsError> {
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

fn address_msg(ip: Ipv4Addr, ifindex: u32) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = 32;
    m.header.index = ifindex;
    m.header.scope = AddressScope::Universe;
    m.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
    m.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
    m
}

fn rule_msg(spec: &RuleSpec, node_ip: Ipv4Addr, ifname: &str) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.dst_len = 32;
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(spec.table).unwrap_or(0);
    m.attributes.push(RuleAttribute::Table(spec.table));
    m.attributes.push(RuleAttribute::Priority(spec.priority));
    m.attributes
        .push(RuleAttribute::Destination(IpAddr::V4(node_ip)));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(
            PROTO_PORTSLICE,
        )));
    if let Some(p) = spec.ip_proto {
        m.attributes
            .push(RuleAttribute::IpProtocol(IpProtocol::from(p)));
    }
    if let Some((start, end)) = spec.dport {
        m.attributes
            .push(RuleAttribute::DestinationPortRange(RulePortRange {
                start,
                end,
            }));
    }
    if spec.iif_pod {
        m.attributes
            .push(RuleAttribute::Iifname(ifname.to_string()));
    }
    m
}

/// `pref N lookup local`; ours carries our protocol mark, the restored one the kernel's.
fn local_rule_msg(priority: u32, ours: bool) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    m.header.table = TABLE_LOCAL as u8;
    m.attributes.push(RuleAttribute::Table(TABLE_LOCAL));
    m.attributes.push(RuleAttribute::Priority(priority));
    let proto = if ours {
        RouteProtocol::Other(PROTO_PORTSLICE)
    } else {
        RouteProtocol::Kernel
    };
    m.attributes.push(RuleAttribute::Protocol(proto));
    m
}

/// The parts of a rule we compare.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParsedRule {
    priority: u32,
    table: u32,
    proto: u8,
    dst: Option<Ipv4Addr>,
    ip_proto: Option<u8>,
    dport: Option<(u16, u16)>,
    iif: Option<String>,
}

impl ParsedRule {
    fn from_spec(spec: &RuleSpec, node_ip: Ipv4Addr, ifname: &str) -> Self {
        Self {
            priority: spec.priority,
            table: spec.table,
            proto: PROTO_PORTSLICE,
            dst: Some(node_ip),
            ip_proto: spec.ip_proto,
            dport: spec.dport,
            iif: spec.iif_pod.then(|| ifname.to_string()),
        }
    }
}

fn parse_rule(r: &RuleMessage) -> ParsedRule {
    let mut p = ParsedRule {
        priority: 0,
        table: u32::from(r.header.table),
        proto: 0,
        dst: None,
        ip_proto: None,
        dport: None,
        iif: None,
    };
    for a in &r.attributes {
        match a {
            RuleAttribute::Priority(v) => p.priority = *v,
            RuleAttribute::Table(t) => p.table = *t,
            RuleAttribute::Protocol(v) => p.proto = u8::from(*v),
            RuleAttribute::Destination(IpAddr::V4(ip)) => p.dst = Some(*ip),
            RuleAttribute::IpProtocol(v) => p.ip_proto = Some(i32::from(*v) as u8),
            RuleAttribute::DestinationPortRange(pr) => p.dport = Some((pr.start, pr.end)),
            RuleAttribute::Iifname(n) => p.iif = Some(n.clone()),
            _ => {}
        }
    }
    p
}

fn table_of(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| {
            if let RouteAttribute::Table(t) = a {
                Some(*t)
            } else {
                None
            }
        })
        .unwrap_or(u32::from(r.header.table))
}

fn is_default(r: &RouteMessage) -> bool {
    table_of(r) == TABLE_MAIN
        && r.header.destination_prefix_length == 0
        && r.header.kind == RouteType::Unicast
}

fn default_route(routes: &[RouteMessage]) -> Option<&RouteMessage> {
    routes.iter().find(|r| is_default(r))
}

fn addr_attr(
    r: &RouteMessage,
    pick: impl Fn(&RouteAttribute) -> Option<&RouteAddress>,
) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match pick(a) {
        Some(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn gateway_of(r: &RouteMessage) -> Option<Ipv4Addr> {
    addr_attr(r, |a| {
        if let RouteAttribute::Gateway(g) = a {
            Some(g)
        } else {
            None
        }
    })
}

fn pref_source(r: &RouteMessage) -> Option<Ipv4Addr> {
    addr_attr(r, |a| {
        if let RouteAttribute::PrefSource(g) = a {
            Some(g)
        } else {
            None
        }
    })
}

fn destination(r: &RouteMessage) -> Option<Ipv4Addr> {
    addr_attr(r, |a| {
        if let RouteAttribute::Destination(g) = a {
            Some(g)
        } else {
            None
        }
    })
}
