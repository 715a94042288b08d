//! Applying, checking and removing a slice pod's wiring ([`crate::plan::PodWiring`]), for each
//! address family it has. Every function here runs on the thread that entered the pod's netns
//! (see [`crate::thread::in_netns`]) and speaks to the kernel only through the typed operations
//! of [`crate::netlink`].

use std::net::IpAddr;
use std::path::PathBuf;

use crate::netlink::address::Address;
use crate::netlink::route::NewRoute;
use crate::netlink::rule::{PROTO_KERNEL, Rule};
use crate::netlink::{Nl, ignore_exists, ignore_missing, is_errno};
use crate::plan::{
    FIRST_RULE_PRIORITY, FamilyWiring, LOCAL_RULE_PRIORITY, PROTO_PORTSLICE, PodWiring, RuleSpec,
    TABLE_LOCAL, TABLE_MAIN,
};
use crate::sysctl::{self, Key};
use crate::{Family, NetnsError, NodeAddrs};

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

/// `arp_announce` of the pod interface: with two IPv4 addresses on it, ARP requests must not name
/// the node address as sender (see [`apply_steps`]).
fn arp_announce(ifname: &str) -> Key {
    Key::interface("ipv4", ifname, "arp_announce")
}

/// The sysctls ADD changes, which it saves first: the ephemeral range and the unprivileged
/// start (one each, for both families), and `arp_announce` when the pod gets the IPv4 address.
fn changed_sysctls(w: &PodWiring) -> Vec<Key> {
    let mut keys = vec![Key::unprivileged_port_start(), Key::local_port_range()];
    if w.ipv4.is_some() {
        keys.push(arp_announce(&w.ifname));
    }
    keys
}

/// The node address on the pod interface: `/32` or `/128`.
fn node_address(ifindex: u32, node_ip: IpAddr) -> Address {
    Address {
        ifindex,
        ip: node_ip,
        prefix: Family::of(node_ip).bits(),
    }
}

/// Wires the pod. On failure, removes what it added and restores the sysctls before returning
/// the error: ADD leaves nothing behind. The returned [`Applied`] lets a later failure of ADD
/// (the datapath) undo it all with [`undo`].
pub fn apply(w: &PodWiring) -> Result<Applied, NetnsError> {
    let nl = Nl::new()?;
    let link = nl.link_by_name(&w.ifname)?;
    let saved = changed_sysctls(w)
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
    let mut errors = Vec::new();
    for f in w.families() {
        errors.extend(cleanup(nl, f.node_ip, ifindex));
    }
    // Restore in reverse order: the port range first, as the kernel checks the unprivileged
    // start against it.
    for (key, value) in saved.iter().rev() {
        if let Err(e) = sysctl::write(key, value) {
            errors.push(e.to_string());
        }
    }
    errors
}

/// The kernel rule for one of the plan's rules, in the rule list of `node_ip`'s family.
fn rule_of(spec: &RuleSpec, node_ip: IpAddr, ifname: &str) -> Rule {
    Rule {
        family: Family::of(node_ip),
        priority: spec.priority,
        table: spec.table,
        protocol: PROTO_PORTSLICE,
        destination: Some(node_ip),
        ip_proto: spec.ip_proto,
        dport: spec.dport,
        iif: spec.iif_pod.then(|| ifname.to_string()),
    }
}

/// `pref N lookup local` of `family`; ours carries our protocol mark, the restored one the
/// kernel's.
fn local_rule(family: Family, priority: u32, ours: bool) -> Rule {
    Rule {
        family,
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
    // before moving the range down. Both govern IPv6 sockets too.
    let current_unpriv = saved
        .iter()
        .find(|(k, _)| *k == Key::unprivileged_port_start())
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(1024);
    if let Some(start) = w.unprivileged_port_start(current_unpriv) {
        sysctl::write(&Key::unprivileged_port_start(), &start.to_string())?;
    }
    sysctl::write(&Key::local_port_range(), &w.local_port_range())?;
    if w.ipv4.is_some() {
        // With two addresses on the interface, ARP requests must not name the node address as
        // sender: the node drops them as martian (its own address) on any L3 interface without
        // accept_local, e.g. a bridge. 2 = the address of the target's subnet, the private one.
        // (IPv6 has no such check: a neighbour solicitation from the node address is answered.)
        sysctl::write(&arp_announce(&w.ifname), "2")?;
    }
    for f in w.families() {
        apply_family(nl, w, f, ifindex)?;
    }
    Ok(())
}

/// One family's address, routes and rules.
fn apply_family(nl: &Nl, w: &PodWiring, f: &FamilyWiring, ifindex: u32) -> Result<(), NetnsError> {
    let family = f.family();
    // The node address /32 (/128), after the private one so the private stays the primary.
    ignore_exists(nl.add_address(
        node_address(ifindex, f.node_ip),
        &format!("adding the node address {}", f.node_ip),
    ))?;

    // Default route: same gateway, now with `src <node IP>`.
    let routes = nl.routes(family)?;
    let gateway = match routes.iter().find(|r| r.is_default()) {
        Some(r) => {
            nl.set_pref_source(
                r,
                Some(f.node_ip),
                &format!("setting src {} on the default route", f.node_ip),
            )?;
            r.gateway
                .or(f.gateway)
                .ok_or(NetnsError::NoGateway(family))?
        }
        None => {
            let gw = f.gateway.ok_or(NetnsError::NoGateway(family))?;
            let route = NewRoute {
                destination: family.unspecified(),
                prefix: 0,
                gateway: gw,
                pref_source: f.node_ip,
                oif: ifindex,
                protocol: PROTO_PORTSLICE,
            };
            nl.add_route(
                &route,
                &format!("adding the {} default route", family.name()),
            )?;
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

    // The node address /32 (/128) in the main table, via the same gateway: what `to <node IP>
    // lookup main` finds for ports that are not the pod's, and the route the reference plugins'
    // CHECK looks up for every address of their interface (ours has no prefix route otherwise).
    ignore_exists(nl.add_route(
        &via_gateway(f.node_ip, family.bits(), f.node_ip),
        "adding the route to the node address",
    ))?;

    // Cluster CIDRs keep the private address as source.
    for cidr in &f.cluster_cidrs {
        let res = nl.add_route(
            &via_gateway(cidr.network(), cidr.prefix(), f.private.addr()),
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
    // it leaves priority 0, so there is no instant without it. IPv4 and IPv6 have a rule list
    // each, so each gets its own.
    for spec in w.rules() {
        ignore_exists(nl.add_rule(
            &rule_of(&spec, f.node_ip, &w.ifname),
            &format!("adding {} policy rule {spec:?}", family.name()),
        ))?;
    }
    ignore_exists(nl.add_rule(
        &local_rule(family, LOCAL_RULE_PRIORITY, true),
        &format!("moving the {} local table rule", family.name()),
    ))?;
    for rule in nl.rules(family)? {
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

/// Removes everything PortSlice added in the pod for `node_ip`'s family (DEL, and undo after a
/// failed ADD). Collects errors and carries on. Leaves the sysctls: the caller restores them when
/// it knows the old values. Harmless for a family the pod never got.
pub fn cleanup(nl: &Nl, node_ip: IpAddr, ifindex: u32) -> Vec<String> {
    let family = Family::of(node_ip);
    let mut errors = Vec::new();
    let mut note = |r: Result<(), NetnsError>| {
        if let Err(e) = r {
            errors.push(e.to_string());
        }
    };
    // The local table rule goes back to priority 0 before ours go, so there is no instant
    // without it.
    note(ignore_exists(nl.add_rule(
        &local_rule(family, 0, false),
        &format!("restoring the {} local table rule", family.name()),
    )));
    match nl.rules(family) {
        Ok(rules) => {
            for rule in rules.iter().filter(|r| r.protocol == PROTO_PORTSLICE) {
                note(ignore_missing(
                    nl.del_rule(rule, "removing a PortSlice policy rule"),
                ));
            }
        }
        Err(e) => note(Err(e)),
    }
    match nl.routes(family) {
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
        node_address(ifindex, node_ip),
        "removing the node address",
    )));
    errors
}

/// DEL inside the pod: finds the interface, cleans up every family of the node, and puts back
/// the sysctls ADD changed (`restore`, from [`Applied::saved_sysctls`]; in reverse, as [`undo`]
/// does). A missing interface means the primary plugin already removed it: only the sysctls are
/// left to restore.
pub fn teardown(
    ifname: &str,
    node: &NodeAddrs,
    restore: &[(PathBuf, String)],
) -> Result<(), NetnsError> {
    let nl = Nl::new()?;
    let mut errors = match nl.link_by_name(ifname) {
        Ok(link) => node
            .iter()
            .flat_map(|ip| cleanup(&nl, ip, link.index))
            .collect(),
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

/// CHECK inside the pod: every piece of the wiring is in place, for every family. Returns the
/// pod link so the caller can check the datapath entry for its peer.
pub fn check(w: &PodWiring) -> Result<PodLink, NetnsError> {
    let nl = Nl::new()?;
    let link = nl.link_by_name(&w.ifname)?;
    let mut problems = Vec::new();
    for f in w.families() {
        check_family(&nl, w, f, link.index, &mut problems)?;
    }
    if w.ipv4.is_some() {
        match sysctl::read(&arp_announce(&w.ifname)) {
            Ok(v) if v == "2" => {}
            Ok(v) => problems.push(format!("arp_announce on {} is {v}, want 2", w.ifname)),
            Err(e) => problems.push(e.to_string()),
        }
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

fn check_family(
    nl: &Nl,
    w: &PodWiring,
    f: &FamilyWiring,
    ifindex: u32,
    problems: &mut Vec<String>,
) -> Result<(), NetnsError> {
    let family = f.family();
    let bits = family.bits();
    if !nl
        .addresses(family)?
        .contains(&node_address(ifindex, f.node_ip))
    {
        problems.push(format!(
            "node address {}/{bits} missing on {}",
            f.node_ip, w.ifname
        ));
    }
    let routes = nl.routes(family)?;
    match routes.iter().find(|r| r.is_default()) {
        Some(r) if r.pref_source == Some(f.node_ip) => {}
        Some(_) => problems.push(format!("default route lacks src {}", f.node_ip)),
        None => problems.push(format!("no {} default route", family.name())),
    }
    let node_routed = routes
        .iter()
        .any(|r| r.table == TABLE_MAIN && r.prefix == bits && r.destination == Some(f.node_ip));
    if !node_routed {
        problems.push(format!(
            "no main-table route to the node address {}",
            f.node_ip
        ));
    }
    for cidr in &f.cluster_cidrs {
        let routed = routes
            .iter()
            .any(|r| r.prefix == cidr.prefix() && r.destination == Some(cidr.network()));
        if !routed {
            problems.push(format!("no route to cluster CIDR {cidr}"));
        }
    }
    let rules: Vec<Rule> = nl.rules(family)?.into_iter().map(|r| r.item).collect();
    for spec in w.rules() {
        if !rules.contains(&rule_of(&spec, f.node_ip, &w.ifname)) {
            problems.push(format!("{} policy rule missing: {spec:?}", family.name()));
        }
    }
    let local_early = rules.iter().any(|r| {
        r.table == TABLE_LOCAL && r.priority < FIRST_RULE_PRIORITY && r.destination.is_none()
    });
    if local_early {
        problems.push(format!(
            "the {} local table rule is still ahead of the PortSlice rules",
            family.name()
        ));
    }
    if !rules
        .iter()
        .any(|r| r.table == TABLE_LOCAL && r.destination.is_none())
    {
        problems.push(format!("no {} local table rule at all", family.name()));
    }
    Ok(())
}
