//! Applying, checking and removing a slice pod's wiring ([`crate::plan::PodWiring`]). Every
//! function here runs on the thread that entered the pod's netns (see [`crate::thread::in_netns`])
//! and speaks to the kernel only through the typed operations of [`crate::netlink`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::NetnsError;
use crate::netlink::address::Address;
use crate::netlink::route::NewRoute;
use crate::netlink::rule::{PROTO_KERNEL, Rule};
use crate::netlink::{Nl, ignore_exists, ignore_missing, is_errno};
use crate::plan::{
    FIRST_RULE_PRIORITY, LOCAL_RULE_PRIORITY, PROTO_PORTSLICE, PodWiring, RuleSpec, TABLE_LOCAL,
    TABLE_MAIN,
};
use crate::sysctl::{self, Key};

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
    let link = Nl::new()?.link_by_name(ifname)?;
    Ok(PodLink {
        ifindex: link.index,
        peer_ifindex: link.peer_index,
    })
}

/// What ADD changed that cleanup cannot find by itself: the sysctls' previous values.
#[derive(Debug, Clone)]
pub struct Applied {
    pub link: PodLink,
    saved: Vec<(Key, String)>,
}

impl Applied {
    /// The sysctls ADD changed, with their values before: DEL puts them back
    /// ([`teardown`]). Paths, so they can be stored between the two.
    pub fn saved_sysctls(&self) -> Vec<(PathBuf, String)> {
        self.saved
            .iter()
            .map(|(k, v)| (k.path().to_path_buf(), v.clone()))
            .collect()
    }
}

/// `arp_announce` of the pod interface: with two addresses on it, ARP requests must not name the
/// node address as sender (see [`apply_steps`]).
fn arp_announce(ifname: &str) -> Key {
    Key::interface("ipv4", ifname, "arp_announce")
}

/// Wires the pod. On failure, removes what it added and restores the sysctls before returning
/// the error: ADD leaves nothing behind. The returned [`Applied`] lets a later failure of ADD
/// (the datapath) undo it all with [`undo`].
pub fn apply(w: &PodWiring) -> Result<Applied, NetnsError> {
    let nl = Nl::new()?;
    let link = nl.link_by_name(&w.ifname)?;
    let saved = [
        Key::unprivileged_port_start(),
        Key::local_port_range(),
        arp_announce(&w.ifname),
    ]
    .into_iter()
    .map(|k| sysctl::read(&k).map(|v| (k, v)))
    .collect::<Result<Vec<_>, _>>()?;
    match apply_steps(&nl, w, link.index, &saved) {
        Ok(()) => Ok(Applied {
            link: PodLink {
                ifindex: link.index,
                peer_ifindex: link.peer_index,
            },
            saved,
        }),
        Err(first) => {
            let undo = undo_with(&nl, w, link.index, &saved);
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
        Err(NetnsError::Cleanup(errors))
    }
}

fn undo_with(nl: &Nl, w: &PodWiring, ifindex: u32, saved: &[(Key, String)]) -> Vec<String> {
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

/// The kernel rule for one of the plan's rules.
fn rule_of(spec: &RuleSpec, node_ip: Ipv4Addr, ifname: &str) -> Rule {
    Rule {
        priority: spec.priority,
        table: spec.table,
        protocol: PROTO_PORTSLICE,
        destination: Some(node_ip),
        ip_proto: spec.ip_proto,
        dport: spec.dport,
        iif: spec.iif_pod.then(|| ifname.to_string()),
    }
}

/// `pref N lookup local`; ours carries our protocol mark, the restored one the kernel's.
fn local_rule(priority: u32, ours: bool) -> Rule {
    Rule {
        priority,
        table: TABLE_LOCAL,
        protocol: if ours { PROTO_PORTSLICE } else { PROTO_KERNEL },
        destination: None,
        ip_proto: None,
        dport: None,
        iif: None,
    }
}

fn apply_steps(
    nl: &Nl,
    w: &PodWiring,
    ifindex: u32,
    saved: &[(Key, String)],
) -> Result<(), NetnsError> {
    // Sysctls: the unprivileged start must never be above the port range's start, so lower it
    // before moving the range down.
    let current_unpriv = saved
        .iter()
        .find(|(k, _)| *k == Key::unprivileged_port_start())
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(1024);
    if let Some(start) = w.unprivileged_port_start(current_unpriv) {
        sysctl::write(&Key::unprivileged_port_start(), &start.to_string())?;
    }
    sysctl::write(&Key::local_port_range(), &w.local_port_range())?;
    // With two addresses on the interface, ARP requests must not name the node address as
    // sender: the node drops them as martian (its own address) on any L3 interface without
    // accept_local, e.g. a bridge. 2 = the address of the target's subnet, the private one.
    sysctl::write(&arp_announce(&w.ifname), "2")?;

    // The node address /32, after the private one so the private stays the primary.
    let node_address = Address {
        ifindex,
        ip: w.node_ip,
        prefix: 32,
    };
    ignore_exists(nl.add_address(node_address, "adding the node address"))?;

    // Default route: same gateway, now with `src <node IP>`.
    let routes = nl.routes_v4()?;
    let gateway = match routes.iter().find(|r| r.is_default()) {
        Some(r) => {
            nl.set_pref_source(
                r,
                Some(w.node_ip),
                "setting src <node IP> on the default route",
            )?;
            r.gateway.or(w.gateway).ok_or(NetnsError::NoGateway)?
        }
        None => {
            let gw = w.gateway.ok_or(NetnsError::NoGateway)?;
            let route = NewRoute {
                destination: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
                gateway: gw,
                pref_source: w.node_ip,
                oif: ifindex,
                protocol: PROTO_PORTSLICE,
            };
            nl.add_route(&route, "adding the default route")?;
            gw
        }
    };
    let via_gateway = |destination, prefix, pref_source| NewRoute {
        destination,
        prefix,
        gateway,
        pref_source,
        oif: ifindex,
        protocol: PROTO_PORTSLICE,
    };

    // The node address /32 in the main table, via the same gateway: what `to <node IP> lookup
    // main` finds for ports that are not the pod's, and the route the reference plugins' CHECK
    // looks up for every address of their interface (our /32 has no prefix route otherwise).
    ignore_exists(nl.add_route(
        &via_gateway(w.node_ip, 32, w.node_ip),
        "adding the route to the node address",
    ))?;

    // Cluster CIDRs keep the private address as source.
    for cidr in &w.cluster_cidrs {
        let res = nl.add_route(
            &via_gateway(cidr.network(), cidr.prefix, w.private.addr),
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
        ignore_exists(nl.add_rule(
            &rule_of(&spec, w.node_ip, &w.ifname),
            &format!("adding policy rule {spec:?}"),
        ))?;
    }
    ignore_exists(nl.add_rule(
        &local_rule(LOCAL_RULE_PRIORITY, true),
        "moving the local table rule",
    ))?;
    for rule in nl.rules_v4()? {
        if rule.table == TABLE_LOCAL
            && rule.priority < FIRST_RULE_PRIORITY
            && rule.ip_proto.is_none()
            && rule.destination.is_none()
        {
            nl.del_rule(&rule, "removing the local table rule at priority 0")?;
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
    note(ignore_exists(nl.add_rule(
        &local_rule(0, false),
        "restoring the local table rule",
    )));
    match nl.rules_v4() {
        Ok(rules) => {
            for rule in rules.iter().filter(|r| r.protocol == PROTO_PORTSLICE) {
                note(ignore_missing(
                    nl.del_rule(rule, "removing a PortSlice policy rule"),
                ));
            }
        }
        Err(e) => note(Err(e)),
    }
    match nl.routes_v4() {
        Ok(routes) => {
            for r in &routes {
                if r.protocol == PROTO_PORTSLICE {
                    note(ignore_missing(
                        nl.del_route(r, "removing a PortSlice route"),
                    ));
                } else if r.is_default() && r.pref_source == Some(node_ip) {
                    note(nl.set_pref_source(r, None, "restoring the default route"));
                }
            }
        }
        Err(e) => note(Err(e)),
    }
    note(ignore_missing(nl.del_address(
        Address {
            ifindex,
            ip: node_ip,
            prefix: 32,
        },
        "removing the node address",
    )));
    errors
}

/// DEL inside the pod: finds the interface, cleans up, and puts back the sysctls ADD changed
/// (`restore`, from [`Applied::saved_sysctls`]; in reverse, as [`undo`] does). A missing
/// interface means the primary plugin already removed it: only the sysctls are left to restore.
pub fn teardown(
    ifname: &str,
    node_ip: Ipv4Addr,
    restore: &[(PathBuf, String)],
) -> Result<(), NetnsError> {
    let nl = Nl::new()?;
    let mut errors = match nl.link_by_name(ifname) {
        Ok(link) => cleanup(&nl, node_ip, link.index),
        Err(NetnsError::NoInterface(_)) => Vec::new(),
        Err(e) => return Err(e),
    };
    for (path, value) in restore.iter().rev() {
        if let Err(e) = sysctl::write(&Key::from_path(path.clone()), value) {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(NetnsError::Cleanup(errors))
    }
}

/// CHECK inside the pod: every piece of the wiring is in place. Returns the pod link so the
/// caller can check the datapath entry for its peer.
pub fn check(w: &PodWiring) -> Result<PodLink, NetnsError> {
    let nl = Nl::new()?;
    let link = nl.link_by_name(&w.ifname)?;
    let mut problems = Vec::new();
    let node_address = Address {
        ifindex: link.index,
        ip: w.node_ip,
        prefix: 32,
    };
    if !nl.addresses_v4()?.contains(&node_address) {
        problems.push(format!(
            "node address {}/32 missing on {}",
            w.node_ip, w.ifname
        ));
    }
    let routes = nl.routes_v4()?;
    match routes.iter().find(|r| r.is_default()) {
        Some(r) if r.pref_source == Some(w.node_ip) => {}
        Some(_) => problems.push(format!("default route lacks src {}", w.node_ip)),
        None => problems.push("no default route".into()),
    }
    let node_routed = routes
        .iter()
        .any(|r| r.table == TABLE_MAIN && r.prefix == 32 && r.destination == Some(w.node_ip));
    if !node_routed {
        problems.push(format!(
            "no main-table route to the node address {}",
            w.node_ip
        ));
    }
    for cidr in &w.cluster_cidrs {
        let routed = routes
            .iter()
            .any(|r| r.prefix == cidr.prefix && r.destination == Some(cidr.network()));
        if !routed {
            problems.push(format!("no route to cluster CIDR {cidr}"));
        }
    }
    let rules: Vec<Rule> = nl.rules_v4()?.into_iter().map(|r| r.item).collect();
    for spec in w.rules() {
        if !rules.contains(&rule_of(&spec, w.node_ip, &w.ifname)) {
            problems.push(format!("policy rule missing: {spec:?}"));
        }
    }
    let local_early = rules.iter().any(|r| {
        r.table == TABLE_LOCAL && r.priority < FIRST_RULE_PRIORITY && r.destination.is_none()
    });
    if local_early {
        problems.push("the local table rule is still ahead of the PortSlice rules".into());
    }
    if !rules
        .iter()
        .any(|r| r.table == TABLE_LOCAL && r.destination.is_none())
    {
        problems.push("no local table rule at all".into());
    }
    match sysctl::read(&arp_announce(&w.ifname)) {
        Ok(v) if v == "2" => {}
        Ok(v) => problems.push(format!("arp_announce on {} is {v}, want 2", w.ifname)),
        Err(e) => problems.push(e.to_string()),
    }
    match sysctl::read(&Key::local_port_range()) {
        Ok(v) if v == w.local_port_range() => {}
        Ok(v) => problems.push(format!(
            "ip_local_port_range is {v:?}, want {:?}",
            w.local_port_range()
        )),
        Err(e) => problems.push(e.to_string()),
    }
    if problems.is_empty() {
        Ok(PodLink {
            ifindex: link.index,
            peer_ifindex: link.peer_index,
        })
    } else {
        Err(NetnsError::Check(problems))
    }
}
