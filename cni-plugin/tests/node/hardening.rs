//! Datapath hardening, with real traffic through the real programs: a slice pod may send ICMP
//! errors only about its own flows; no pod or remote can evict another pod's fragment or echo
//! state; per-slice allowed sources. Each test fails without the feature its name states.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, LpmTrie, Map, MapData};
use portslice_datapath::{SourceCidr, abi, layout};
use portslice_testkit::Family;
use portslice_testkit::rows::{self, A, ANY, B, HOSTILE, in_range, sa};
use portslice_testkit::traffic::{
    drain, echo_holder, echo_request, icmp_error, icmp_log, ping_with_id, ping_with_id_waiting,
    quoted, quoted_echo, send_icmp, send_raw_ip, stream_for, tcp_request, tcp_server,
    udp_first_fragment, udp_fragments, udp_request, udp_sees_port_unreachable, udp_seq_counter,
    udp_seq_stream, udp_server, udp_sizes,
};
use portslice_testkit::{NODE_IP, REMOTE_IP, REMOTE_IP2, REMOTE_IP3, Topology, require_root};

/// The value of the first metric line starting with `prefix`.
fn metric(m: &str, prefix: &str) -> Option<u64> {
    m.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn slice_drops(t: &Topology, slice: &str, reason: &str) -> u64 {
    let m = t.metrics_get("/metrics").expect("metrics");
    metric(
        &m,
        &format!("portslice_slice_drops_total{{slice=\"{slice}\",reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no {reason} drops of {slice} in\n{m}"))
}

fn node_event(t: &Topology, event: &str) -> u64 {
    let m = t.metrics_get("/metrics").expect("metrics");
    metric(
        &m,
        &format!("portslice_datapath_packets_total{{event=\"{event}\"}}"),
    )
    .unwrap_or_else(|| panic!("no {event} counter in\n{m}"))
}

fn cidrs(list: &[&str]) -> Vec<SourceCidr> {
    list.iter().map(|s| s.parse().expect("a CIDR")).collect()
}

/// The forged errors come from the hostile pod (10.244.0.3, slice `test/slice-3`, ports
/// 40200-40209) and go to the remote, which would lower its path MTU to the node address (for
/// every slice and the host) or tear down the victim's and the host's flows on them.
#[test]
fn slice_pod_sends_icmp_errors_only_about_its_own_flows() {
    if !require_root("icmp-errors") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(A)); // the victim, 40000-40099
    t.add_pod(Some(HOSTILE));
    t.add_remote_address(REMOTE_IP2);
    let (_log, seen) = icmp_log(&t.remote);
    let hostile = &t.pods[1].ns;
    let remote = sa(REMOTE_IP, 5000);
    let victim = sa(NODE_IP, 40010);
    let mtu = {
        let mut r = [0u8; 4];
        r[2..4].copy_from_slice(&1200u16.to_be_bytes());
        r
    };
    let forged: Vec<(&str, Vec<u8>)> = vec![
        (
            "frag-needed about the victim's UDP flow",
            icmp_error(3, 4, mtu, &quoted(17, remote, victim)),
        ),
        (
            "frag-needed about the victim's TCP flow",
            icmp_error(3, 4, mtu, &quoted(6, remote, victim)),
        ),
        (
            "port unreachable about the victim's UDP flow",
            icmp_error(3, 3, [0; 4], &quoted(17, remote, victim)),
        ),
        (
            "frag-needed about the host's ssh",
            icmp_error(3, 4, mtu, &quoted(6, remote, sa(NODE_IP, 22))),
        ),
        (
            "port unreachable about a host UDP port",
            icmp_error(
                3,
                3,
                [0; 4],
                &quoted(17, remote, sa(NODE_IP, rows::HOST_PORT)),
            ),
        ),
        (
            "frag-needed about the host's own outgoing flow",
            icmp_error(3, 4, mtu, &quoted(6, sa(NODE_IP, 22), remote)),
        ),
        (
            "port unreachable about its own port, sent to a host that never sent it",
            icmp_error(
                3,
                3,
                [0; 4],
                &quoted(17, sa(REMOTE_IP2, 5000), sa(NODE_IP, 40205)),
            ),
        ),
        (
            "time exceeded about the victim's flow",
            icmp_error(11, 1, [0; 4], &quoted(17, remote, victim)),
        ),
        (
            "parameter problem about the victim's flow",
            icmp_error(12, 0, [0; 4], &quoted(6, remote, victim)),
        ),
        (
            // Even about its own flow: the remote's path MTU to the node address is everyone's.
            "frag-needed about its own flow",
            icmp_error(3, 4, mtu, &quoted(17, remote, sa(NODE_IP, 40205))),
        ),
        (
            "an error about an echo with an id outside its range",
            icmp_error(3, 3, [0; 4], &quoted_echo(REMOTE_IP, NODE_IP, 40010)),
        ),
    ];
    let drops_before = slice_drops(&t, "test/slice-3", "icmp_error");
    for (what, icmp) in &forged {
        send_icmp(hostile, REMOTE_IP, icmp.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // Errors about its own flows get out: one it writes itself, and its kernel's own answer to
    // a datagram for a port of its slice where nothing listens.
    let own = icmp_error(3, 3, [0; 4], &quoted(17, remote, sa(NODE_IP, 40205)));
    send_icmp(hostile, REMOTE_IP, own).expect("own error");
    assert_eq!(
        udp_sees_port_unreachable(&t.remote, sa(NODE_IP, 40206)),
        Ok(true),
        "the pod's own port unreachable must reach the remote"
    );
    std::thread::sleep(Duration::from_millis(300));

    let seen = seen.lock().unwrap().clone();
    let errors: Vec<_> = seen
        .iter()
        .filter(|m| m.src == NODE_IP && matches!(m.ty, 3 | 11 | 12))
        .collect();
    for m in &errors {
        let (_, src, dst) = m.quoted_flow().expect("a quoted header");
        assert!(
            *dst.ip() == NODE_IP && in_range(dst.port(), HOSTILE) && *src.ip() == REMOTE_IP,
            "a forged error got out: {m:?}"
        );
    }
    let quoted_ports: Vec<u16> = errors
        .iter()
        .filter_map(|m| m.quoted_flow().map(|(_, _, d)| d.port()))
        .collect();
    assert!(
        quoted_ports.contains(&40205) && quoted_ports.contains(&40206),
        "the pod's own errors did not get out: {errors:?}"
    );
    // Nothing lowered the remote's path MTU towards the node address.
    let route = t.remote.ip(&["route", "get", &NODE_IP.to_string()]);
    assert!(!route.contains("mtu 1200"), "{route}");
    // Counted for the pod and node-wide.
    let dropped = slice_drops(&t, "test/slice-3", "icmp_error") - drops_before;
    assert_eq!(dropped, forged.len() as u64, "per-pod icmp_error drops");
    assert!(node_event(&t, "drop_icmp_error") >= forged.len() as u64);
    // The victim's own errors and its PMTU are untouched (row 8 still holds).
    rows::row8_ping_and_icmp_errors_reach_the_slice_pod(&t.pods[0].ns, Family::V4);
}

/// The host's own pings keep their replies: an echo id of a slice's range is the pod's only
/// towards the remote the pod pinged (the host pings with whatever id it likes, and a third of
/// the id space is the pool).
#[test]
fn the_hosts_ping_with_an_id_a_pod_uses_keeps_its_reply() {
    if !require_root("echo-host") {
        return;
    }
    let mut t = Topology::new();
    t.add_pod(Some(HOSTILE));
    t.add_remote_address(REMOTE_IP2);
    // The pod's request with id 40203 lands in slot 40203 of its range (40200-40209).
    assert_eq!(ping_with_id(&t.pods[0].ns, REMOTE_IP, 40203, 1), Ok(true));
    assert_eq!(
        ping_with_id(&t.node, REMOTE_IP2, 40203, 1),
        Ok(true),
        "the host's reply from another remote was steered to the pod"
    );
    // The pod still gets its own.
    assert_eq!(ping_with_id(&t.pods[0].ns, REMOTE_IP, 40203, 2), Ok(true));
}

/// Entries of the pinned `frags` map owned by the pod with host ifindex `owner`.
fn frag_entries_of(t: &Topology, owner: u32) -> usize {
    let path = layout::map_pin(&t.pin_root, abi::map::FRAGS);
    let frags: HashMap<MapData, abi::FragKey, abi::FragVal> =
        Map::from_map_data(MapData::from_pin(path).expect("frags pin"))
            .expect("frags map")
            .try_into()
            .expect("frags shape");
    frags
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| v.host_ifindex == owner)
        .count()
}

/// A victim pod has a ping out (the remote holds the reply) and the first fragment of a datagram
/// in; a hostile pod and the remote then flood 20,000 first fragments each and the hostile pod
/// pings 20,000 addresses with ids covering the victim's range. Node-wide LRUs (8192 fragments,
/// 16384 echo ids) would have evicted the victim's state; per-pod bounds keep it.
#[test]
fn floods_from_a_pod_and_a_remote_leave_another_pods_echo_and_fragment_state_alone() {
    if !require_root("state-floods") {
        return;
    }
    const FLOOD: u32 = 20_000;
    let mut t = Topology::new();
    t.add_pod(Some(A)); // the victim, 40000-40099
    t.add_pod(Some(HOSTILE));
    let hostile = t.pods[1].host_ifindex;
    let (srv, sizes) = udp_sizes(&t.pods[0].ns, ANY, 40010);
    // Neighbours resolved first, so no flood packet waits on ARP.
    assert_eq!(ping_with_id(&t.pods[1].ns, REMOTE_IP, 1, 1), Ok(true));
    t.remote.sysctl("net.ipv4.icmp_echo_ignore_all", "1");
    let datagram = udp_fragments(sa(REMOTE_IP, 5555), sa(NODE_IP, 40010), 0x7777, 4000, 1480);
    assert_eq!(datagram.len(), 3);
    let pings: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| {
            let dst = Ipv4Addr::new(10, 99, (i / 256) as u8, (i % 256) as u8);
            // Ids across the victim's range and its own ids: confinement, not luck, keeps
            // them apart.
            let id = if i % 2 == 0 {
                i / 2
            } else {
                40000 + (i / 2) % 300
            };
            echo_request(NODE_IP, dst, id as u16, i as u16)
        })
        .collect();
    // To an address the node cannot route: its entries are recorded before the forward, and the
    // remote's own reassembly memory (shared by everything from the node address: not the
    // datapath's state) stays out of the test.
    let pod_frags: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| {
            let dst = SocketAddrV4::new(Ipv4Addr::new(10, 98, 0, 1), 6000);
            udp_first_fragment(sa(NODE_IP, 40201), dst, i as u16)
        })
        .collect();
    let remote_frags: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| udp_first_fragment(sa(REMOTE_IP, 7000), sa(NODE_IP, 40201), i as u16))
        .collect();

    let holder = echo_holder(&t.remote);
    let victim = &t.pods[0].ns;
    let (reply, answered) = std::thread::scope(|s| {
        // 1. The victim's ping goes out; the remote holds the reply.
        let ping =
            s.spawn(|| ping_with_id_waiting(victim, REMOTE_IP, 777, 1, Duration::from_secs(15)));
        std::thread::sleep(Duration::from_millis(200));
        // 2. The hostile pod pings 20,000 addresses (echo state of 20,000 remotes).
        let sent = send_raw_ip(&t.pods[1].ns, pings).expect("ping flood");
        assert_eq!(sent, FLOOD as usize, "the ping flood was not sent");
        // 3. The victim's first fragment, then 20,000 first fragments from the hostile pod and
        //    20,000 from the remote to the hostile pod's ports, then the rest of the datagram.
        let started = std::time::Instant::now();
        send_raw_ip(&t.remote, vec![datagram[0].clone()]).expect("first fragment");
        let sent = send_raw_ip(&t.pods[1].ns, pod_frags).expect("pod fragment flood");
        assert_eq!(
            sent, FLOOD as usize,
            "the pod's fragment flood was not sent"
        );
        let sent = send_raw_ip(&t.remote, remote_frags).expect("remote fragment flood");
        assert_eq!(
            sent, FLOOD as usize,
            "the remote's fragment flood was not sent"
        );
        send_raw_ip(&t.remote, datagram[1..].to_vec()).expect("rest of the datagram");
        let took = started.elapsed();
        // The victim's entry lives PS_FRAG_TIMEOUT_NS: a slower flood would prove nothing.
        assert!(
            took < Duration::from_millis(1800),
            "the fragment floods took {took:?}"
        );
        let answered = holder.release();
        (ping.join().unwrap(), answered)
    });
    // The victim's state survived both floods.
    assert_eq!(
        reply,
        Ok(true),
        "the victim's echo reply was lost (remote answered {answered:?})"
    );
    let got = portslice_testkit::eventually(Duration::from_secs(2), || {
        sizes.lock().unwrap().contains(&4000).then_some(())
    });
    assert!(
        got.is_some(),
        "the victim's fragmented datagram never arrived whole: {:?}",
        sizes.lock().unwrap()
    );

    // 4. The floods were capped by the hostile pod's own quota, not absorbed by a shared map.
    let owned = frag_entries_of(&t, hostile);
    assert!(
        owned <= 2 * abi::FRAG_QUOTA as usize,
        "the hostile pod holds {owned} fragment entries"
    );
    assert!(node_event(&t, "fragment_untracked") >= u64::from(FLOOD));

    // 5. While the hostile pod's share is still full, the victim's new datagrams and pings work.
    t.remote.sysctl("net.ipv4.icmp_echo_ignore_all", "0");
    drop(srv);
    rows::row11_fragmented_udp_arrives_whole_both_ways(&t, &t.pods[0].ns, Family::V4);
    assert_eq!(ping_with_id(&t.pods[0].ns, REMOTE_IP, 778, 2), Ok(true));
    // Complete datagrams hold no share: the victim's entries are gone.
    assert_eq!(frag_entries_of(&t, t.pods[0].host_ifindex), 0);
}

/// Entries of the pinned `src_allow` trie that belong to the pod with host ifindex `pod`.
fn source_entries_of(t: &Topology, pod: u32) -> usize {
    let path = layout::map_pin(&t.pin_root, abi::map::SRC_ALLOW);
    let trie: LpmTrie<MapData, abi::SrcData, abi::SrcVal> =
        Map::from_map_data(MapData::from_pin(path).expect("src_allow pin"))
            .expect("src_allow map")
            .try_into()
            .expect("src_allow shape");
    trie.keys()
        .filter_map(Result::ok)
        .filter(|k| k.data().pod == pod)
        .count()
}

/// The remote has three addresses: .2 (allowed), .3 (refused, then allowed), .4 (never listed).
#[test]
fn allowed_sources_filter_remote_traffic_per_slice_and_edits_never_open_it() {
    if !require_root("allowed-sources") {
        return;
    }
    let mut t = Topology::new();
    t.add_remote_address(REMOTE_IP2);
    t.add_remote_address(REMOTE_IP3);
    t.add_pod(Some(A)); // the filtered slice pod
    t.add_pod(None); // a plain pod: reaches the slice from its private address (row 4)
    let (cid, pod_if) = (t.pods[0].container_id.clone(), t.pods[0].host_ifindex);
    let _tcp = tcp_server(&t.pods[0].ns, ANY, 40010, "pod");
    let _udp = udp_server(&t.pods[0].ns, ANY, 40010, "pod");
    let set = |t: &Topology, list: &[&str]| {
        let (cid, list) = (cid.clone(), cidrs(list));
        t.with_datapath(move |dp| {
            dp.set_allowed_sources(&cid, &list)
                .expect("set_allowed_sources");
            dp.allowed_sources(&cid).expect("allowed_sources")
        })
    };
    let reaches = |t: &Topology, from: Ipv4Addr| {
        let tcp = tcp_request(&t.remote, sa(NODE_IP, 40010), Some(sa(from, 0).into()));
        let udp = udp_request(&t.remote, sa(from, 0), sa(NODE_IP, 40010), 10);
        match (tcp, udp) {
            (Ok(a), Ok(b)) if a.starts_with("pod ") && b.starts_with("pod ") => true,
            (Err(_), Err(_)) => false,
            other => panic!("TCP and UDP from {from} disagree: {other:?}"),
        }
    };

    // No list: anyone.
    assert!(reaches(&t, REMOTE_IP) && reaches(&t, REMOTE_IP2));
    // A list of one.
    let stored = set(&t, &["198.18.0.2/32"]);
    assert_eq!(stored, cidrs(&["198.18.0.2/32"]));
    let drops_before = slice_drops(&t, "test/slice-2", "source");
    assert!(reaches(&t, REMOTE_IP), "the allowed source is refused");
    assert!(!reaches(&t, REMOTE_IP2), "a source outside the list got in");
    let plain = (&t.pods[1].ns, t.pods[1].private_ip);
    assert!(
        tcp_request(plain.0, sa(NODE_IP, 40010), None).is_err(),
        "another pod's private address is a source too"
    );
    // The node's own traffic is not filtered (lo, from the node address), nor the pod's own
    // flows to a listed peer.
    let r = tcp_request(&t.node, sa(NODE_IP, 40010), None).expect("host -> filtered pod");
    assert!(r.starts_with("pod 198.18.0.1:"), "{r}");
    let _remote = tcp_server(&t.remote, ANY, 5000, "remote");
    tcp_request(&t.pods[0].ns, sa(REMOTE_IP, 5000), None).expect("pod -> listed remote");
    // Counted: per slice with reason "source", and node-wide.
    let dropped = slice_drops(&t, "test/slice-2", "source") - drops_before;
    assert!(
        dropped >= 3,
        "refused TCP SYNs and datagrams not counted: {dropped}"
    );
    assert!(node_event(&t, "drop_source") >= dropped);
    // Prefixes: the plain pod's network.
    set(&t, &["198.18.0.2/32", "10.244.0.0/16"]);
    let r = tcp_request(plain.0, sa(NODE_IP, 40010), None).expect("listed pod network");
    assert!(r.contains(&plain.1.to_string()), "{r}");

    // Edits while traffic runs: a TCP transfer and a datagram stream from .2 (in every list),
    // a stream from .4 (in none). Nothing from .2 is lost, nothing from .4 gets in.
    let listener = t.pods[0]
        .ns
        .enter(|| TcpListener::bind("0.0.0.0:40020").unwrap());
    let receiver = std::thread::spawn(move || drain(listener.accept().unwrap().0));
    let conn = t
        .remote
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddrV4::new(NODE_IP, 40020).into(),
                Duration::from_secs(3),
            )
        })
        .expect("connect from the allowed source");
    let (_seq, seen) = udp_seq_counter(&t.pods[0].ns, ANY, 40011);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let s = stop.clone();
        std::thread::spawn(move || stream_for(conn, s))
    };
    let gap = Duration::from_micros(200);
    let allowed = udp_seq_stream(
        &t.remote,
        sa(REMOTE_IP, 0),
        sa(NODE_IP, 40011),
        gap,
        stop.clone(),
    );
    let never = udp_seq_stream(
        &t.remote,
        sa(REMOTE_IP3, 0),
        sa(NODE_IP, 40011),
        gap,
        stop.clone(),
    );
    let lists: [&[&str]; 5] = [
        &["198.18.0.2/32"],
        &["198.18.0.2/32", "198.18.0.3/32"],
        &["198.18.0.0/30"],
        &["198.18.0.2/31", "10.244.0.0/16"],
        &["198.18.0.3/32", "198.18.0.2/32"],
    ];
    for i in 0..40 {
        set(&t, lists[i % lists.len()]);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (sent_allowed, sent_never) = (allowed.join().unwrap(), never.join().unwrap());
    let bytes_sent = sender
        .join()
        .unwrap()
        .expect("the transfer survived the edits");
    let bytes_received = receiver.join().unwrap().expect("receiver saw no error");
    assert!(bytes_sent > 0);
    assert_eq!(
        bytes_sent, bytes_received,
        "bytes lost while the list changed"
    );
    std::thread::sleep(Duration::from_millis(200));
    let seen = seen.lock().unwrap().clone();
    let got = |ip: Ipv4Addr| seen.get(&ip).map_or(0, |s| s.len() as u64);
    assert!(sent_allowed > 500, "only {sent_allowed} datagrams sent");
    assert_eq!(
        got(REMOTE_IP),
        sent_allowed,
        "datagrams from the allowed source were dropped during an edit"
    );
    assert!(sent_never > 500);
    assert_eq!(
        got(REMOTE_IP3),
        0,
        "a source in no list got in during an edit"
    );

    // The empty list opens the ports to anyone again.
    assert!(set(&t, &[]).is_empty());
    assert!(reaches(&t, REMOTE_IP3));
    assert_eq!(source_entries_of(&t, pod_if), 0);

    // A list given at attach time filters the first packet; DEL removes the list.
    t.add_pod_unattached(Some(B));
    let b = t.attachment(2);
    let (b_cid, b_if) = (b.container_id.clone(), b.host_veth_ifindex);
    let list = cidrs(&["198.18.0.3/32"]);
    t.with_datapath(move |dp| {
        dp.attach_pod_with_sources(&b, &list)
            .expect("attach with sources");
        dp.check_pod(&b).expect("check");
        // A plain re-attach (CNI ADD again) keeps the list.
        dp.attach_pod(&b).expect("attach again");
        assert_eq!(dp.allowed_sources(&b.container_id).unwrap(), list);
    });
    let _b = udp_server(&t.pods[2].ns, ANY, 40110, "b");
    assert!(udp_request(&t.remote, sa(REMOTE_IP, 0), sa(NODE_IP, 40110), 10).is_err());
    assert!(udp_request(&t.remote, sa(REMOTE_IP2, 0), sa(NODE_IP, 40110), 10).is_ok());
    assert_eq!(source_entries_of(&t, b_if), 1);
    t.with_datapath(move |dp| dp.detach_pod(&b_cid, Some(b_if)).expect("detach"));
    assert_eq!(source_entries_of(&t, b_if), 0, "DEL left the list behind");
}
