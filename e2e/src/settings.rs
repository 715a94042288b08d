//! What the suite runs against, read from `PORTSLICE_E2E_*` variables. Defaults fit the kind
//! cluster of `e2e/scripts/kind.sh` (whose `env` prints them); any other cluster sets its own.
//! The nodes themselves come from the API server.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{var}={value:?} is not valid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// Where `{node}` goes in [`Settings::node_exec`].
pub const NODE_PLACEHOLDER: &str = "{node}";

#[derive(Debug, Clone)]
pub struct Settings {
    /// The remote host's address as the nodes see it (kind: the docker host on the kind network).
    pub remote_ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack cluster (kind: the kind network's IPv6 gateway); the
    /// IPv6 checks run only with one.
    pub remote_ip6: Option<Ipv6Addr>,
    /// A name the cluster DNS resolves to the remote host, if it has one.
    pub remote_name: Option<String>,
    /// Command prefix that runs a program on the remote host; empty: this machine is it.
    pub remote_exec: Vec<String>,
    /// Command prefix that runs a program on a node, `{node}` standing for its name (kind:
    /// `docker exec {node}`).
    pub node_exec: Vec<String>,
    /// `node.uplink` for the chart, when the nodes' uplink is not the chart's default.
    pub uplink: Option<String>,
    pub helm: PathBuf,
    pub kubectl: PathBuf,
    pub chart: PathBuf,
    /// Helm release name and namespace.
    pub release: String,
    pub release_namespace: String,
    /// Image of the e2e workload (busybox + portslice-e2e-agent).
    pub agent_image: String,
    /// The agent binary for the remote side.
    pub agent_bin: PathBuf,
    /// Image of Debian's coturn (examples/40-coturn.yaml) and the examples directory.
    pub coturn_image: String,
    pub examples: PathBuf,
    /// Extra `--set` values for helm install (images, pools).
    pub helm_sets: Vec<String>,
    /// The nodes' CNI conf and bin dirs and bpffs pin root, for the "node is clean" checks.
    pub cni_conf_dir: String,
    pub cni_bin_dir: String,
    pub pin_root: String,
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

impl Settings {
    /// Reads `PORTSLICE_E2E_*` variables through `get` (pure, so it is testable).
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        agent_bin: PathBuf,
        repo: PathBuf,
    ) -> Result<Self, SettingsError> {
        let set = |k: &str| get(k).filter(|v| !v.is_empty());
        let var = |k: &str, d: &str| set(k).unwrap_or_else(|| d.to_string());
        let remote_ip = var("PORTSLICE_E2E_REMOTE_IP", "198.19.0.1");
        let remote_ip =
            remote_ip
                .parse()
                .map_err(|e: std::net::AddrParseError| SettingsError::Invalid {
                    var: "PORTSLICE_E2E_REMOTE_IP",
                    value: remote_ip.clone(),
                    reason: e.to_string(),
                })?;
        let remote_ip6 =
            match set("PORTSLICE_E2E_REMOTE_IP6") {
                None => None,
                Some(v) => Some(v.parse().map_err(|e: std::net::AddrParseError| {
                    SettingsError::Invalid {
                        var: "PORTSLICE_E2E_REMOTE_IP6",
                        value: v.clone(),
                        reason: e.to_string(),
                    }
                })?),
            };
        let node_exec = words(&var("PORTSLICE_E2E_NODE_EXEC", "docker exec {node}"));
        if !node_exec.iter().any(|w| w.contains(NODE_PLACEHOLDER)) {
            return Err(SettingsError::Invalid {
                var: "PORTSLICE_E2E_NODE_EXEC",
                value: node_exec.join(" "),
                reason: format!(
                    "must name the node as {NODE_PLACEHOLDER}, e.g. \"ssh {NODE_PLACEHOLDER}\""
                ),
            });
        }
        let cache = var("PORTSLICE_CACHE", "/var/cache/portslice");
        let k8s = var("K8S_VERSION", "1.34.4");
        Ok(Settings {
            remote_ip,
            remote_ip6,
            remote_name: Some(var("PORTSLICE_E2E_REMOTE_NAME", "remote.portslice.test"))
                .filter(|n| n != "none"),
            // Unset or empty: this machine is the remote host.
            remote_exec: words(&get("PORTSLICE_E2E_REMOTE_EXEC").unwrap_or_default()),
            node_exec,
            uplink: set("PORTSLICE_E2E_UPLINK"),
            helm: var("PORTSLICE_E2E_HELM", &format!("{cache}/bin/helm")).into(),
            kubectl: var(
                "PORTSLICE_E2E_KUBECTL",
                &format!("{cache}/k8s-v{k8s}/bin/kubectl"),
            )
            .into(),
            chart: set("PORTSLICE_E2E_CHART")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo.join("charts/portslice")),
            release: var("PORTSLICE_E2E_RELEASE", "portslice"),
            release_namespace: var("PORTSLICE_E2E_RELEASE_NAMESPACE", "portslice-system"),
            agent_image: var(
                "PORTSLICE_E2E_AGENT_IMAGE",
                "localhost/portslice-e2e-agent:dev",
            ),
            agent_bin,
            coturn_image: var(
                "PORTSLICE_E2E_COTURN_IMAGE",
                "localhost/portslice-coturn:dev",
            ),
            examples: repo.join("examples"),
            helm_sets: set("PORTSLICE_E2E_HELM_SET")
                .map(|s| words(&s))
                .unwrap_or_default(),
            cni_conf_dir: var("PORTSLICE_E2E_CNI_CONF_DIR", "/etc/cni/net.d"),
            cni_bin_dir: var("PORTSLICE_E2E_CNI_BIN_DIR", "/opt/cni/bin"),
            pin_root: var("PORTSLICE_E2E_PIN_ROOT", "/sys/fs/bpf/portslice"),
        })
    }

    /// `argv` run on node `node`.
    pub fn on_node(&self, node: &str, argv: &[&str]) -> Vec<String> {
        self.node_exec
            .iter()
            .map(|w| w.replace(NODE_PLACEHOLDER, node))
            .chain(argv.iter().map(|s| s.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_the_kind_cluster() {
        let s = Settings::from_lookup(|_| None, "/agent".into(), "/repo".into()).unwrap();
        assert_eq!(s.remote_ip, Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(
            s.remote_ip6, None,
            "IPv6 checks only where the remote has an address"
        );
        assert!(s.remote_exec.is_empty(), "the docker host is the remote");
        assert_eq!(
            s.on_node("portslice-worker", &["cat", "/x"]),
            ["docker", "exec", "portslice-worker", "cat", "/x"]
        );
        assert_eq!(s.uplink, None, "kind's eth0 is the chart's default");
        assert_eq!(s.chart, PathBuf::from("/repo/charts/portslice"));
    }

    #[test]
    fn other_clusters_set_their_own() {
        let env = |k: &str| match k {
            "PORTSLICE_E2E_REMOTE_IP" => Some("192.0.2.9".into()),
            "PORTSLICE_E2E_REMOTE_EXEC" => Some("ssh remote".into()),
            "PORTSLICE_E2E_NODE_EXEC" => Some("ssh root@{node}".into()),
            "PORTSLICE_E2E_REMOTE_NAME" => Some("none".into()),
            "PORTSLICE_E2E_UPLINK" => Some("ens5".into()),
            "PORTSLICE_E2E_REMOTE_IP6" => Some("2001:2:0:1::1".into()),
            _ => None,
        };
        let s = Settings::from_lookup(env, "/agent".into(), "/repo".into()).unwrap();
        assert_eq!(s.remote_ip, Ipv4Addr::new(192, 0, 2, 9));
        assert_eq!(s.remote_ip6, Some("2001:2:0:1::1".parse().unwrap()));
        assert_eq!(s.remote_exec, ["ssh", "remote"]);
        assert_eq!(s.on_node("n1", &["true"]), ["ssh", "root@n1", "true"]);
        assert_eq!(s.remote_name, None);
        assert_eq!(s.uplink.as_deref(), Some("ens5"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let env = |k: &str| (k == "PORTSLICE_E2E_REMOTE_IP").then(|| "300.1.1.1".to_string());
        let e = Settings::from_lookup(env, "/a".into(), "/r".into()).unwrap_err();
        assert!(e.to_string().contains("PORTSLICE_E2E_REMOTE_IP"));
        let env = |k: &str| (k == "PORTSLICE_E2E_REMOTE_IP6").then(|| "198.19.0.1".to_string());
        let e = Settings::from_lookup(env, "/a".into(), "/r".into()).unwrap_err();
        assert!(e.to_string().contains("PORTSLICE_E2E_REMOTE_IP6"), "{e}");
        let env = |k: &str| (k == "PORTSLICE_E2E_NODE_EXEC").then(|| "ssh".to_string());
        let e = Settings::from_lookup(env, "/a".into(), "/r".into()).unwrap_err();
        assert!(e.to_string().contains("{node}"), "{e}");
    }
}
