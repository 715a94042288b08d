//! TCPMUX (RFC 1078) on TCP port 1 of the node address, off by default (`--tcpmux`): services
//! found by name on the node itself, for clients that cannot use SRV records.
//!
//! A client sends a service name and CRLF. `HELP` lists the contacts of the slices with a pod on
//! this node, one `<namespace>/<slice>/<name>` per line, for their named TCP ports. A known name
//! is answered `+` and the connection is spliced to that port on the node address (where the
//! datapath steers it to the slice's pod); anything else gets `-` and a reason. The pod sees the
//! daemon's connection, not the client's address.
//!
//! [`contacts`] and [`request`] are pure; [`serve`] is the listener.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kube::ResourceExt as _;
use kube::runtime::reflector::Store;
use portslice_crds::{PortSlice, Protocol};
use portslice_datapath::{PinnedDatapath, PodAttachment};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The TCPMUX port (RFC 1078).
pub const PORT: u16 = 1;
/// A request line longer than this is refused (RFC 1078 names are short).
const MAX_LINE: usize = 256;
/// How long a client may take to name a service.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Every contact on this node, lowercased (names are case-insensitive), to its port: the named
/// TCP ports of each PortSlice whose range a pod on this node holds.
pub fn contacts<'a>(
    slices: impl IntoIterator<Item = &'a PortSlice>,
    pods: &[PodAttachment],
) -> BTreeMap<String, u16> {
    let mut out = BTreeMap::new();
    for s in slices {
        let (Some(ns), Some(status)) = (s.namespace(), s.status.as_ref()) else {
            continue;
        };
        let key = format!("{ns}/{}", s.name_any());
        let here = pods.iter().any(|p| {
            p.slice
                .as_ref()
                .is_some_and(|b| b.slice_key == key && Some(b.range) == status.range)
        });
        if !here {
            continue;
        }
        for n in status
            .named_ports
            .iter()
            .filter(|n| n.protocol == Protocol::TCP)
        {
            out.insert(format!("{key}/{}", n.name).to_ascii_lowercase(), n.port);
        }
    }
    out
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Help,
    Service(String),
}

/// Parses a request line (without its CRLF).
pub fn request(line: &str) -> Request {
    let name = line.trim();
    if name.eq_ignore_ascii_case("help") {
        Request::Help
    } else {
        Request::Service(name.to_ascii_lowercase())
    }
}

/// Where TCPMUX finds the node's slices.
#[derive(Clone)]
pub struct Sources {
    pub pin_root: PathBuf,
    pub slices: Arc<OnceLock<Store<PortSlice>>>,
}

impl Sources {
    fn contacts(&self) -> BTreeMap<String, u16> {
        let Some(store) = self.slices.get() else {
            return BTreeMap::new();
        };
        let pods = PinnedDatapath::open_if_loaded(&self.pin_root)
            .ok()
            .flatten()
            .and_then(|dp| dp.list_pods().ok())
            .unwrap_or_default();
        let state = store.state();
        contacts(state.iter().map(AsRef::as_ref), &pods)
    }
}

/// Serves TCPMUX on `node_ip`:1 until the process ends.
pub async fn serve(node_ip: Ipv4Addr, sources: Sources) -> anyhow::Result<()> {
    let addr = SocketAddr::V4(SocketAddrV4::new(node_ip, PORT));
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("binding TCPMUX to {addr}: {e} (port 1 needs CAP_NET_BIND_SERVICE)")
    })?;
    tracing::info!(%addr, "serving TCPMUX");
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "TCPMUX accept");
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            if let Err(e) = session(conn, node_ip, &sources).await {
                tracing::debug!(%peer, error = %e, "TCPMUX session ended");
            }
        });
    }
}

async fn session(conn: TcpStream, node_ip: Ipv4Addr, sources: &Sources) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut reader).take(MAX_LINE as u64).read_line(&mut line),
    )
    .await;
    let mut conn = reader.into_inner();
    if !matches!(read, Ok(Ok(n)) if n > 0 && line.ends_with('\n')) {
        return conn.write_all(b"-request too long or incomplete\r\n").await;
    }
    let s = sources.clone();
    let contacts = tokio::task::spawn_blocking(move || s.contacts())
        .await
        .unwrap_or_default();
    match request(&line) {
        Request::Help => {
            let mut text = String::new();
            for name in contacts.keys() {
                text.push_str(name);
                text.push_str("\r\n");
            }
            conn.write_all(text.as_bytes()).await
        }
        Request::Service(name) => {
            let Some(port) = contacts.get(&name) else {
                return conn.write_all(b"-unknown service\r\n").await;
            };
            // The node address: the datapath steers it to the slice's pod (matrix row 5).
            let mut upstream = match TcpStream::connect(SocketAddrV4::new(node_ip, *port)).await {
                Ok(u) => u,
                Err(e) => {
                    let msg = format!("-{name} does not answer: {e}\r\n");
                    return conn.write_all(msg.as_bytes()).await;
                }
            };
            conn.write_all(b"+\r\n").await?;
            tokio::io::copy_bidirectional(&mut conn, &mut upstream)
                .await
                .map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portslice_crds::{NamedPorts, PortRange, PortSliceSpec, PortSliceStatus};
    use portslice_datapath::SliceBinding;

    const R: PortRange = PortRange {
        start: 40000,
        end: 40009,
    };

    fn slice(ns: &str, name: &str, range: PortRange) -> PortSlice {
        let mut s = PortSlice::new(name, PortSliceSpec::of_size(10));
        s.metadata.namespace = Some(ns.into());
        s.status = Some(PortSliceStatus {
            range: Some(range),
            named_ports: vec![
                NamedPorts {
                    name: "Ctl".into(),
                    protocol: Protocol::TCP,
                    port: range.start + 3,
                    count: 1,
                },
                NamedPorts {
                    name: "rtp".into(),
                    protocol: Protocol::UDP,
                    port: range.start + 4,
                    count: 5,
                },
            ],
            ..PortSliceStatus::default()
        });
        s
    }

    fn pod(key: &str, range: PortRange) -> PodAttachment {
        PodAttachment {
            container_id: "c".into(),
            host_veth_ifindex: 3,
            pod_private_ip: Ipv4Addr::new(10, 244, 0, 3),
            slice: Some(SliceBinding {
                slice_key: key.into(),
                range,
                protocols: Protocol::ALL.to_vec(),
            }),
        }
    }

    #[test]
    fn contacts_are_the_named_tcp_ports_of_slices_here() {
        let other = PortRange {
            start: 41000,
            end: 41009,
        };
        let slices = [slice("tel", "voice", R), slice("tel", "away", other)];
        let c = contacts(&slices, &[pod("tel/voice", R)]);
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            [("tel/voice/ctl".to_string(), 40003)]
        );
    }

    #[test]
    fn requests_are_case_insensitive() {
        assert_eq!(request("help\r\n"), Request::Help);
        assert_eq!(request("HELP"), Request::Help);
        assert_eq!(
            request("Tel/Voice/CTL\r\n"),
            Request::Service("tel/voice/ctl".into())
        );
    }
}
