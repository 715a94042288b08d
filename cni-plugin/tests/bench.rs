//! The datapath benchmark (issue 4), run by `e2e/scripts/bench-datapath.sh`: ignored by a plain
//! `cargo test`. One topology, side by side: host networking (a process in the node netns, the
//! limit), a slice pod, and a pod behind the reference `portmap` plugin's NAT; then the same with
//! 10,000 ports allocated (a 10,000-port slice vs 10,000 portmap-style iptables DNAT rules vs one
//! nftables DNAT rule over a 10,000-entry map). Then the same three on an IPv6-only node
//! (2001:2::1; the portmap plugin's IPv6 NAT is ip6tables), and the IPv6 slice pod with 10,000
//! ports.
//!
//! Environment: `PORTSLICE_BENCH_QUICK=1` (short runs for CI; asserts nothing about speed),
//! `PORTSLICE_BENCH_OUT=<file>` (write the table between the datapath-bench markers).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use portslice_datapath::{PodAttachment, PortRange, Protocol, SliceBinding};
use portslice_testkit::{Family, Netns, Stack, Topology, node_ip, require_root, sh};

struct Settings {
    quick: bool,
    secs: u64,
    /// conn/s is the noisiest figure on a shared machine: the median of this many runs.
    conn_runs: usize,
    rr_iterations: usize,
    conn_threads: usize,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var("PORTSLICE_BENCH_QUICK").is_ok_and(|v| v == "1");
        if quick {
            Self {
                quick,
                secs: 1,
                conn_runs: 1,
                rr_iterations: 500,
                conn_threads: 2,
            }
        } else {
            Self {
                quick,
                secs: 5,
                conn_runs: 3,
                rr_iterations: 20_000,
                conn_threads: 4,
            }
        }
    }
}

/// Where a target's servers listen and what the remote dials.
struct Target {
    label: String,
    /// The node address of the family the remote dials.
    addr: IpAddr,
    /// Port the remote dials on the node IP for iperf3 (TCP+UDP), and for request/response.
    iperf: u16,
    rr: u16,
}

#[derive(Default, Clone)]
struct Row {
    scenario: String,
    target: String,
    tcp_in_gbps: f64,
    tcp_out_gbps: f64,
    udp_kpps: f64,
    conn_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    conntrack: usize,
}

/// Servers for one target: iperf3 (child process) and a request/response server (threads).
struct Servers {
    iperf: Child,
    stop: Arc<AtomicBool>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.iperf.kill();
        let _ = self.iperf.wait();
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn start_servers(ns: &Netns, iperf_port: u16, rr_port: u16) -> Servers {
    let iperf = ns
        .command("iperf3")
        .args(["-s", "-p", &iperf_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let stop = Arc::new(AtomicBool::new(false));
    // [::] serves both families; a netns without IPv6 has only 0.0.0.0.
    let l = ns.enter(move || {
        TcpListener::bind(("::", rr_port))
            .or_else(|_| TcpListener::bind(("0.0.0.0", rr_port)))
            .expect("rr listener")
    });
    l.set_nonblocking(true).unwrap();
    let l = Arc::new(l);
    for _ in 0..2 {
        let (l, stop) = (l.clone(), stop.clone());
        std::thread::spawn(move || rr_server(&l, &stop));
    }
    std::thread::sleep(Duration::from_millis(400));
    Servers { iperf, stop }
}

/// Echoes 64-byte requests until the client closes; closes first after a "one-shot" request
/// (first byte b'1') so TIME_WAIT lands on the server, not on the client's port range.
fn rr_server(l: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let Ok((mut c, _)) = l.accept() else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        let _ = c.set_nonblocking(false);
        let _ = c.set_nodelay(true);
        let mut buf = [0u8; 64];
        while c.read_exact(&mut buf).is_ok() {
            if c.write_all(&buf).is_err() || buf[0] == b'1' {
                break;
            }
        }
    }
}

fn iperf(remote: &Netns, addr: IpAddr, port: u16, args: &[&str], secs: u64) -> serde_json::Value {
    let p = port.to_string();
    let t = secs.to_string();
    let host = addr.to_string();
    let mut a = vec!["-c", &host, "-p", &p, "-t", &t, "-J"];
    a.extend_from_slice(args);
    let out = remote
        .command("iperf3")
        .args(&a)
        .output()
        .expect("iperf3 client");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "iperf3 {a:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn tcp_gbps(remote: &Netns, addr: IpAddr, port: u16, reverse: bool, secs: u64) -> f64 {
    let args: &[&str] = if reverse { &["-R"] } else { &[] };
    let j = iperf(remote, addr, port, args, secs);
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn udp_kpps(remote: &Netns, addr: IpAddr, port: u16, secs: u64) -> f64 {
    let j = iperf(remote, addr, port, &["-u", "-b", "0", "-l", "64"], secs);
    let s = &j["end"]["sum"];
    let received = s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
    received / s["seconds"].as_f64().unwrap_or(1.0).max(0.001) / 1e3
}

/// Connections per second: connect, one 64-byte request/response, server closes, client closes.
fn conn_rate(remote: &Netns, addr: IpAddr, port: u16, threads: usize, secs: u64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (count, errors) = (count.clone(), errors.clone());
            let file = std::fs::File::open(remote.path()).unwrap();
            std::thread::spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let dst = SocketAddr::new(addr, port);
                let mut req = [b'0'; 64];
                req[0] = b'1';
                while Instant::now() < deadline {
                    let ok = (|| -> std::io::Result<()> {
                        let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(1))?;
                        c.set_nodelay(true)?;
                        c.set_read_timeout(Some(Duration::from_secs(1)))?;
                        c.write_all(&req)?;
                        let mut buf = [0u8; 64];
                        c.read_exact(&mut buf)?;
                        Ok(())
                    })();
                    match ok {
                        Ok(()) => count.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let n = count.load(Ordering::SeqCst) as f64;
    let e = errors.load(Ordering::SeqCst);
    if e > 0 {
        eprintln!("  ({e} failed connections)");
    }
    n / start.elapsed().as_secs_f64()
}

/// Request/response latency on one connection: p50, p99 in microseconds.
fn latency(remote: &Netns, addr: IpAddr, port: u16, iterations: usize) -> (f64, f64) {
    let mut samples: Vec<f64> = remote.enter(move || {
        let mut c = TcpStream::connect(SocketAddr::new(addr, port)).expect("rr connect");
        c.set_nodelay(true).unwrap();
        let req = [b'0'; 64];
        let mut buf = [0u8; 64];
        let mut out = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            c.write_all(&req).unwrap();
            c.read_exact(&mut buf).unwrap();
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
        out
    });
    samples.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (pct(0.50), pct(0.99))
}

fn conntrack_total(node: &Netns) -> usize {
    let out = node
        .command("conntrack")
        .args(["-C"])
        .output()
        .expect("conntrack -C");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn measure(t: &Topology, s: &Settings, scenario: &str, target: &Target) -> Row {
    let a = target.addr;
    let (p50, p99) = latency(&t.remote, a, target.rr, s.rr_iterations);
    let tcp_in = tcp_gbps(&t.remote, a, target.iperf, false, s.secs);
    let tcp_out = tcp_gbps(&t.remote, a, target.iperf, true, s.secs);
    let udp = udp_kpps(&t.remote, a, target.iperf, s.secs);
    // Warm-up (discarded): the first burst of connections after a quiet spell runs slower
    // (page cache, slab, TIME_WAIT buckets), which would penalise whoever is measured first.
    let _ = conn_rate(&t.remote, a, target.rr, s.conn_threads, 1);
    let mut conns = Vec::new();
    let mut conntrack = 0;
    for _ in 0..s.conn_runs {
        let _ = t.node.command("conntrack").arg("-F").output();
        let before = conntrack_total(&t.node);
        conns.push(conn_rate(&t.remote, a, target.rr, s.conn_threads, s.secs));
        conntrack = conntrack.max(conntrack_total(&t.node).saturating_sub(before));
    }
    conns.sort_by(|a, b| a.total_cmp(b));
    let conn = conns[conns.len() / 2];
    let row = Row {
        scenario: scenario.into(),
        target: target.label.clone(),
        tcp_in_gbps: tcp_in,
        tcp_out_gbps: tcp_out,
        udp_kpps: udp,
        conn_per_s: conn,
        p50_us: p50,
        p99_us: p99,
        conntrack,
    };
    eprintln!(
        "  {:<28} {:<22} in {:6.2} Gb/s  out {:6.2} Gb/s  udp {:7.1} kpps  {:8.0} conn/s  p50 {:6.1} us  p99 {:6.1} us  conntrack +{}",
        row.scenario,
        row.target,
        row.tcp_in_gbps,
        row.tcp_out_gbps,
        row.udp_kpps,
        row.conn_per_s,
        row.p50_us,
        row.p99_us,
        row.conntrack
    );
    row
}

/// The reference portmap plugin (Debian's containernetworking-plugins), invoked as a runtime
/// does, in the node netns.
fn portmap(
    t: &Topology,
    verb: &str,
    pod: &portslice_testkit::Pod,
    f: Family,
    maps: &[(u16, u16, &str)],
) {
    let mappings: Vec<_> = maps
        .iter()
        .map(|(h, c, p)| serde_json::json!({"hostPort": h, "containerPort": c, "protocol": p}))
        .collect();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": mappings},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.ns.path()}],
            "ips": [{"address": match f {
                Family::V4 => format!("{}/32", pod.private_ip),
                Family::V6 => format!("{}/128", pod.private(f)),
            }, "interface": 0}],
        },
    });
    let mut child = t
        .node
        .command("/usr/lib/cni/portmap")
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", pod.ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("portmap plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "portmap {verb}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// 10,000 portmap-style DNAT rules in a chain every new connection to a local address walks.
fn iptables_10k(node: &Netns, add: bool) {
    if add {
        let mut rules = String::from("*nat\n:PSBENCH-10K - [0:0]\n");
        for i in 0..10_000u32 {
            let port = 50_000 + i;
            rules.push_str(&format!(
                "-A PSBENCH-10K -p tcp -m tcp --dport {port} -j DNAT --to-destination 10.244.9.{}:{}\n",
                1 + i % 250,
                port
            ));
        }
        rules.push_str("-I PREROUTING 1 -m addrtype --dst-type LOCAL -j PSBENCH-10K\nCOMMIT\n");
        let mut c = node
            .command("iptables-restore")
            .arg("--noflush")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success(), "iptables-restore");
    } else {
        node.run(
            "iptables",
            &[
                "-t",
                "nat",
                "-D",
                "PREROUTING",
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                "-j",
                "PSBENCH-10K",
            ],
        );
        node.run("iptables", &["-t", "nat", "-F", "PSBENCH-10K"]);
        node.run("iptables", &["-t", "nat", "-X", "PSBENCH-10K"]);
    }
}

/// The strongest NAT: one nftables DNAT rule over a 10,000-entry map (O(1) lookup),
/// placed before iptables' nat chains, holding the portmap pod's real mappings among 9,998
/// others.
fn nft_map_10k(node: &Netns, pod_ip: Ipv4Addr, maps: &[(u16, u16)]) {
    let mut elems: Vec<String> = maps
        .iter()
        .map(|(h, c)| format!("{h} : {pod_ip} . {c}"))
        .collect();
    let mut port = 50_000u32;
    while elems.len() < 10_000 {
        elems.push(format!("{port} : 10.244.9.{} . {port}", 1 + port % 250));
        port += 1;
    }
    let script = format!(
        "table ip psbench {{\n map ports {{ type inet_service : ipv4_addr . inet_service; elements = {{ {} }} }}\n chain pre {{\n  type nat hook prerouting priority -110;\n  fib daddr type local dnat ip addr . port to tcp dport map @ports\n }}\n}}\n",
        elems.join(", ")
    );
    let mut c = node
        .command("nft")
        .arg("-f")
        .arg("-")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "nft -f");
}

fn slice_attach(t: &Topology, pod: &portslice_testkit::Pod, range: (u16, u16)) -> Duration {
    let att = PodAttachment {
        container_id: pod.container_id.clone(),
        host_veth_ifindex: pod.host_ifindex,
        pod_private_ip: pod.private_ip,
        slice: Some(SliceBinding {
            slice_key: "bench/media".into(),
            range: PortRange {
                start: range.0,
                end: range.1,
            },
            protocols: vec![Protocol::TCP, Protocol::UDP],
        }),
    };
    t.with_datapath(move |dp| {
        let start = Instant::now();
        dp.attach_pod(&att).expect("attach");
        start.elapsed()
    })
}

/// Datapath attach/detach latency (what CNI ADD/DEL spend in the datapath) for a slice size.
fn attach_latency(
    t: &Topology,
    pod: &portslice_testkit::Pod,
    range: (u16, u16),
    n: usize,
) -> (f64, f64, f64, f64) {
    let mut add = Vec::new();
    let mut del = Vec::new();
    for _ in 0..n {
        let (cid, ifx) = (pod.container_id.clone(), pod.host_ifindex);
        del.push(t.with_datapath(move |dp| {
            let s = Instant::now();
            dp.detach_pod(&cid, Some(ifx)).unwrap();
            s.elapsed().as_secs_f64() * 1e3
        }));
        add.push(slice_attach(t, pod, range).as_secs_f64() * 1e3);
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
    };
    (
        pct(&mut add, 0.5),
        pct(&mut add, 0.99),
        pct(&mut del, 0.5),
        pct(&mut del, 0.99),
    )
}

fn ratio(v: f64, host: f64) -> String {
    if host > 0.0 {
        format!("{:.0}%", v / host * 100.0)
    } else {
        "-".into()
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | target | TCP in Gb/s | TCP out Gb/s | UDP 64B kpps | conn/s | vs host, no rules (in / out / UDP / conn/s) | RR p50 µs | RR p99 µs | conntrack entries |\n|---|---|---:|---:|---:|---:|---|---:|---:|---:|\n",
    );
    // The limit: host networking with no extra rules (the first host row).
    let host = rows.iter().find(|h| h.target.starts_with("host"));
    for r in rows {
        let vs = match host {
            Some(h) if !std::ptr::eq(h, r) => format!(
                "{} / {} / {} / {}",
                ratio(r.tcp_in_gbps, h.tcp_in_gbps),
                ratio(r.tcp_out_gbps, h.tcp_out_gbps),
                ratio(r.udp_kpps, h.udp_kpps),
                ratio(r.conn_per_s, h.conn_per_s)
            ),
            Some(_) => "(the limit)".into(),
            None => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {:.1} | {:.1} | {} |\n",
            r.scenario,
            r.target,
            r.tcp_in_gbps,
            r.tcp_out_gbps,
            r.udp_kpps,
            r.conn_per_s,
            vs,
            r.p50_us,
            r.p99_us,
            r.conntrack
        ));
    }
    out
}

fn write_section(path: &str, body: &str) {
    const BEGIN: &str = "<!-- datapath-bench:begin -->";
    const END: &str = "<!-- datapath-bench:end -->";
    let cur = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let section = format!("{BEGIN}\n{body}{END}");
    let new = match (cur.find(BEGIN), cur.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{}{}", &cur[..a], section, &cur[b + END.len()..]),
        _ => format!("{}\n{}\n", cur.trim_end(), section),
    };
    std::fs::write(path, new).expect("writing the benchmark file");
}

/// What the portmap pod maps: iperf3 (TCP and UDP) and the request/response server.
const PORTMAPS: [(u16, u16, &str); 3] = [
    (8080, 5201, "tcp"),
    (8080, 5201, "udp"),
    (8081, 7000, "tcp"),
];

/// A node sharing only its address of `f`, as the benchmark measures it: kube-proxy-style rules
/// (conntrack tracks everything the host stack sees, as on a node), a remote that opens many
/// short connections (ports, TIME_WAIT reuse), a slice pod of 40000-40099 and a pod behind the
/// portmap plugin's NAT.
fn bench_node(f: Family) -> Topology {
    let mut t = match f {
        Family::V4 => {
            let t = Topology::new_with(Stack::V4);
            portslice_testkit::drop_conntrack_invalid(&t.node);
            t
        }
        Family::V6 => {
            let t = Topology::new_with(Stack::V6);
            portslice_testkit::drop_conntrack_invalid6(&t.node);
            t
        }
    };
    // One sysctl for both families (Linux has no net.ipv6.ip_local_port_range).
    t.remote
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    t.remote.sysctl("net.ipv4.tcp_tw_reuse", "1");
    t.node.sysctl("net.ipv4.tcp_tw_reuse", "1");
    t.add_pod(Some((40000, 40099)));
    t.add_pod_unattached(None);
    portmap(&t, "ADD", &t.pods[1], f, &PORTMAPS);
    t
}

/// The servers of the three targets: on the node, in the slice pod, in the portmap pod.
fn start_all(t: &Topology, host: &Target, slice: &Target) -> [Servers; 3] {
    [
        start_servers(&t.node, host.iperf, host.rr),
        start_servers(&t.pods[0].ns, slice.iperf, slice.rr),
        start_servers(&t.pods[1].ns, 5201, 7000),
    ]
}

/// Host networking, the slice pod and the portmap pod, dialled on the node address of `f`.
fn targets(f: Family) -> (Target, Target, Target) {
    let addr = node_ip(f);
    (
        Target {
            label: "host networking".into(),
            addr,
            iperf: 5201,
            rr: 7000,
        },
        Target {
            label: "slice pod".into(),
            addr,
            iperf: 40010,
            rr: 40011,
        },
        Target {
            label: "portmap pod (NAT)".into(),
            addr,
            iperf: 8080,
            rr: 8081,
        },
    )
}

/// The IPv6 rows, on an IPv6-only node of their own: host, slice pod and portmap pod (its
/// ip6tables DNAT) with one port, then the slice pod holding 10,000 ports.
fn ipv6_rows(s: &Settings) -> Vec<Row> {
    let t = bench_node(Family::V6);
    let (host, slice, nat) = targets(Family::V6);
    let servers = start_all(&t, &host, &slice);
    let mut rows = Vec::new();
    for target in [&host, &slice, &nat] {
        rows.push(measure(&t, s, "IPv6, 1 port", target));
    }
    slice_attach(&t, &t.pods[0], (40000, 49999));
    let slice10 = Target {
        label: "slice pod (10,000-port slice)".into(),
        ..slice
    };
    rows.push(measure(&t, s, "IPv6, 10,000 ports", &slice10));
    drop(servers);
    portmap(&t, "DEL", &t.pods[1], Family::V6, &PORTMAPS);
    rows
}

#[test]
#[ignore = "benchmark: run by e2e/scripts/bench-datapath.sh"]
fn datapath_benchmark() {
    if !require_root("datapath benchmark") {
        return;
    }
    let s = Settings::from_env();
    let t = bench_node(Family::V4);
    let (host, slice, nat) = targets(Family::V4);
    let servers = start_all(&t, &host, &slice);
    let mut rows = Vec::new();
    eprintln!("datapath benchmark ({} s per measurement)", s.secs);
    for target in [&host, &slice, &nat] {
        rows.push(measure(&t, &s, "1 port", target));
    }

    // 10,000 ports allocated.
    let slice_10k = slice_attach(&t, &t.pods[0], (40000, 49999));
    iptables_10k(&t.node, true);
    let slice10 = Target {
        label: "slice pod (10,000-port slice)".into(),
        ..slice
    };
    rows.push(measure(&t, &s, "10,000 ports: iptables", &host));
    rows.push(measure(&t, &s, "10,000 ports: iptables", &slice10));
    rows.push(measure(&t, &s, "10,000 ports: iptables", &nat));
    iptables_10k(&t.node, false);
    nft_map_10k(&t.node, t.pods[1].private_ip, &[(8080, 5201), (8081, 7000)]);
    rows.push(measure(&t, &s, "10,000 ports: nft map", &host));
    rows.push(measure(&t, &s, "10,000 ports: nft map", &slice10));
    rows.push(measure(&t, &s, "10,000 ports: nft map", &nat));
    t.node.run("nft", &["delete", "table", "ip", "psbench"]);
    drop(servers);
    eprintln!("IPv6 (an IPv6-only node, 2001:2::1)");
    let rows6 = ipv6_rows(&s);

    // The slice pod among many: 1 slice, then 1,000 slice pods holding 10,000 ports.
    let (crowd_rows, crowd_count) = crowd(&t, &s, &slice10);

    let n = if s.quick { 5 } else { 50 };
    let small = attach_latency(&t, &t.pods[0], (40000, 40099), n);
    let big = attach_latency(&t, &t.pods[0], (40000, 49999), n);
    portmap(&t, "DEL", &t.pods[1], Family::V4, &PORTMAPS);
    // The real plugin, exec'd as a runtime does (ptp + host-local + portslice), from the CNI
    // tests' helper. Free the slice pod's 10,000 ports first: the CNI pods use 41000-41099.
    let (cid, ifx) = (t.pods[0].container_id.clone(), t.pods[0].host_ifindex);
    t.with_datapath(move |dp| dp.detach_pod(&cid, Some(ifx)).unwrap());

    let mut body = String::new();
    body.push_str(&format!(
        "Measured by `e2e/scripts/bench-datapath.sh` on {} ({} s per throughput/rate measurement, {} request/response round trips, {} client threads). Namespaces on one machine: remote ─veth─ node ─veth─ pod, all traffic through real veths; the remote is the client. \"in\" = remote → target, \"out\" = target → remote (iperf3 -R). conn/s = connect, one 64-byte request/response, close (median of {} runs). conntrack entries = entries the node's conntrack gained during the conn/s run (kube-proxy-style `ctstate INVALID` rules make conntrack track everything the host stack sees). The machine is shared (2 cores, other builds and a test cluster running), so rates move by tens of percent from run to run: read the table for its orders of magnitude (conntrack entries, the 10,000-rule collapse) rather than for single-digit percentages.\n\n",
        sh("uname", &["-sr"]).trim(),
        s.secs,
        s.rr_iterations,
        s.conn_threads,
        s.conn_runs
    ));
    body.push_str(&table(&rows));
    body.push_str("\nIPv6, the same machine and run, on an IPv6-only node (node 2001:2::1, remote 2001:2::2; conntrack made to track IPv6 by ip6tables `ctstate INVALID` rules; the portmap plugin's NAT is ip6tables DNAT):\n\n");
    body.push_str(&table(&rows6));
    body.push_str(&format!(
        "\nDatapath part of CNI ADD/DEL (`PinnedDatapath::attach_pod` / `detach_pod`, {n} runs): 100-port slice ADD p50 {:.2} ms p99 {:.2} ms, DEL p50 {:.2} ms p99 {:.2} ms; 10,000-port slice ADD p50 {:.2} ms p99 {:.2} ms, DEL p50 {:.2} ms p99 {:.2} ms (first 10,000-port attach: {:.2} ms).\n\n",
        small.0, small.1, small.2, small.3, big.0, big.1, big.2, big.3, slice_10k.as_secs_f64() * 1e3
    ));
    body.push_str(&format!(
        "\nSteering among many slices, the same machine and run: the 10,000-port slice pod measured alone, then with {crowd_count} more slice pods on the node (each a real netns and veth with its program attached and {CROWD_PORTS} ports: {} ports of the table held by {} slices). Targets: within 3% on conn/s and UDP pps.\n\n",
        crowd_count * CROWD_PORTS as usize + 10_000,
        crowd_count + 1
    ));
    body.push_str(&table(&crowd_rows));
    body.push_str(&crowd_ratios(&crowd_rows));
    body.push_str(&cni_latency(&t, n));
    println!("\n{body}");
    if let Ok(path) = std::env::var("PORTSLICE_BENCH_OUT") {
        write_section(&path, &body);
        eprintln!("wrote {path}");
    }
}

/// CNI ADD/DEL through the real binary, as a runtime runs it (ptp + host-local + portslice), with
/// the plugin's own breakdown, for each way of attaching the pod's program.
fn cni_latency(t: &Topology, n: usize) -> String {
    use portslice_testkit::latency::{breakdown_table, measure};
    let mut out = String::new();
    for (mode, label) in [
        (Some("tcx"), "tcx link (the default on kernels 6.6+)"),
        (
            Some("clsact"),
            "clsact qdisc + filter (legacy tc, kernels before 6.6)",
        ),
    ] {
        let cni = measure(t, n, mode);
        out.push_str(&format!(
            "CNI ADD/DEL through the real binary, {label} ({} runs, static 100-port slice from CNI_ARGS, no API server): `portslice` ADD p50 {:.1} ms p99 {:.1} ms, DEL p50 {:.1} ms p99 {:.1} ms (process start included); whole chain ptp + host-local + portslice ADD p50 {:.1} ms p99 {:.1} ms, DEL p50 {:.1} ms p99 {:.1} ms. Where `portslice` spends it (each phase's own p50/p99, so the column does not add up to the total's p99):\n\n{}\n",
            cni.runs,
            cni.add.p50_ms,
            cni.add.p99_ms,
            cni.del.p50_ms,
            cni.del.p99_ms,
            cni.chain_add.p50_ms,
            cni.chain_add.p99_ms,
            cni.chain_del.p50_ms,
            cni.chain_del.p99_ms,
            breakdown_table(&cni),
        ));
    }
    out
}

/// The CNI latency part alone, printed (for working on ADD/DEL latency without the traffic rows).
#[test]
#[ignore = "benchmark: run by hand"]
fn cni_latency_benchmark() {
    if !require_root("CNI latency benchmark") {
        return;
    }
    let t = bench_node(Family::V4);
    let n = std::env::var("PORTSLICE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    println!("\n{}", cni_latency(&t, n));
}

/// Slice pods the crowd rows add (quick: a few, to keep the code path alive).
const CROWD: usize = 1000;
/// Ports each of them holds (in 50000-59999, clear of the measured slice and the CNI pods).
const CROWD_PORTS: u16 = 10;

/// The measured slice pod alone, then among [`CROWD`] more slice pods with real netns and veths
/// (made with `ip -batch`: one process per thousand links, not one per command).
fn crowd(t: &Topology, s: &Settings, target: &Target) -> (Vec<Row>, usize) {
    let count = if s.quick { 10 } else { CROWD };
    let _servers = start_servers(&t.pods[0].ns, target.iperf, target.rr);
    let mut rows = vec![measure(t, s, "1 slice on the node", target)];
    let id = format!("{}", std::process::id());
    let name = |i: usize| (format!("psc{id}x{i}"), format!("vc{i}"));
    // `ip -batch` in the node netns (`-n` is no batch command): netns, then veths with their
    // pod end in each.
    let node_ns = t.node.name.clone();
    let batch = |netns: Option<&str>, lines: Vec<String>| {
        let path = std::env::temp_dir().join(format!("portslice-crowd-{id}"));
        std::fs::write(&path, lines.join("\n") + "\n").expect("writing the ip batch");
        let file = path.to_str().expect("utf-8 path");
        match netns {
            Some(ns) => sh("ip", &["-n", ns, "-batch", file]),
            None => sh("ip", &["-batch", file]),
        };
        let _ = std::fs::remove_file(path);
    };
    let started = Instant::now();
    batch(
        None,
        (0..count)
            .map(|i| format!("netns add {}", name(i).0))
            .collect(),
    );
    batch(
        Some(&node_ns),
        (0..count)
            .flat_map(|i| {
                let (ns, veth) = name(i);
                [
                    format!("link add {veth} type veth peer name eth0 netns {ns}"),
                    format!("link set {veth} up"),
                ]
            })
            .collect(),
    );
    let veths: Vec<String> = (0..count).map(|i| name(i).1).collect();
    let ifindexes: Vec<u32> = t.node.enter(move || {
        veths
            .iter()
            .map(|v| portslice_netns::iface::index_of(v).expect("crowd veth"))
            .collect()
    });
    let attachments: Vec<PodAttachment> = (0..count)
        .map(|i| {
            let ifindex = ifindexes[i];
            let first = 50000 + i as u16 * CROWD_PORTS;
            PodAttachment {
                container_id: format!("crowd-{id}-{i}"),
                host_veth_ifindex: ifindex,
                pod_private_ip: Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250) as u8 + 1),
                slice: Some(SliceBinding {
                    slice_key: format!("bench/crowd-{i}"),
                    range: PortRange {
                        start: first,
                        end: first + CROWD_PORTS - 1,
                    },
                    protocols: vec![Protocol::TCP, Protocol::UDP],
                }),
            }
        })
        .collect();
    let ids: Vec<String> = attachments.iter().map(|a| a.container_id.clone()).collect();
    t.with_datapath(move |dp| {
        for a in &attachments {
            dp.attach_pod(a).expect("attach a crowd pod");
        }
    });
    eprintln!(
        "{count} more slice pods made and attached in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    rows.push(measure(
        t,
        s,
        &format!("among {count} more slice pods"),
        target,
    ));
    t.with_datapath(move |dp| {
        for id in &ids {
            dp.detach_pod(id, None).expect("detach a crowd pod");
        }
    });
    batch(
        None,
        (0..count)
            .map(|i| format!("netns del {}", name(i).0))
            .collect(),
    );
    (rows, count)
}

/// The crowd rows' ratios, the figure the target is about.
fn crowd_ratios(rows: &[Row]) -> String {
    let [alone, crowd] = rows else {
        return String::new();
    };
    format!(
        "\nAmong the crowd vs alone: conn/s {:.1}%, UDP pps {:.1}%, TCP in {:.1}%, RR p50 {:.1} vs {:.1} µs.\n\n",
        crowd.conn_per_s / alone.conn_per_s * 100.0,
        crowd.udp_kpps / alone.udp_kpps * 100.0,
        crowd.tcp_in_gbps / alone.tcp_in_gbps * 100.0,
        crowd.p50_us,
        alone.p50_us
    )
}
