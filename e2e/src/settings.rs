//! What the suite runs against. Defaults fit the local cluster of `e2e/scripts/cluster.sh`;
//! `e2e/scripts/kind.sh` sets them for kind.
use std::net::Ipv4Addr;
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

#[derive(Debug, Clone)]
pub struct Settings {
    /// The node address slice pods share (the kubelet's --node-ip).
    pub node_ip: Ipv4Addr,
    /// The remote host's address as the node sees it.
    pub remote_ip: Ipv4Addr,
    /// A name the cluster DNS resolves to the remote host, if it has one.
    pub remote_name: Option<String>,
    /// Command prefix that runs a program on the remote host (e.g. `ip netns exec ps-remote`);
    /// empty: this machine is the remote host.
    pub remote_exec: Vec<String>,
    /// Command prefix that runs a program on the node (e.g. `docker exec kind-control-plane`);
    /// empty: this machine is the node.
    pub node_exec: Vec<String>,
    /// The node's uplink interface, given to the chart.
    pub uplink: String,
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
    /// Extra `--set` values for helm install (images, pools).
    pub helm_sets: Vec<String>,
    /// The node's CNI conf and bin dirs and bpffs pin root, for the "node is clean" checks.
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
        let var = |k: &str, d: &str| {
            get(k)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| d.to_string())
        };
        let ip = |k: &'static str, d: &str| -> Result<Ipv4Addr, SettingsError> {
            let v = var(k, d);
            v.parse()
                .map_err(|e: std::net::AddrParseError| SettingsError::Invalid {
                    var: k,
                    value: v,
                    reason: e.to_string(),
                })
        };
        let cache = var("PORTSLICE_CACHE", "/var/cache/portslice");
        let k8s = var("K8S_VERSION", "1.34.4");
        Ok(Settings {
            node_ip: ip("PORTSLICE_E2E_NODE_IP", "198.18.0.1")?,
            remote_ip: ip("PORTSLICE_E2E_REMOTE_IP", "198.18.0.2")?,
            remote_name: Some(var("PORTSLICE_E2E_REMOTE_NAME", "remote.portslice.test"))
                .filter(|n| n != "none"),
            // Set but empty means: this machine is the remote host.
            remote_exec: words(
                &get("PORTSLICE_E2E_REMOTE_EXEC")
                    .unwrap_or_else(|| "ip netns exec ps-remote".into()),
            ),
            node_exec: words(&get("PORTSLICE_E2E_NODE_EXEC").unwrap_or_default()),
            uplink: var("PORTSLICE_E2E_UPLINK", "psuplink0"),
            helm: var("PORTSLICE_E2E_HELM", &format!("{cache}/bin/helm")).into(),
            kubectl: var(
                "PORTSLICE_E2E_KUBECTL",
                &format!("{cache}/k8s-v{k8s}/bin/kubectl"),
            )
            .into(),
            chart: get("PORTSLICE_E2E_CHART")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo.join("charts/portslice")),
            release: var("PORTSLICE_E2E_RELEASE", "portslice"),
            release_namespace: var("PORTSLICE_E2E_RELEASE_NAMESPACE", "portslice-system"),
            agent_image: var(
                "PORTSLICE_E2E_AGENT_IMAGE",
                "localhost/portslice-e2e-agent:dev",
            ),
            agent_bin,
            helm_sets: get("PORTSLICE_E2E_HELM_SET")
                .map(|s| words(&s))
                .unwrap_or_default(),
            cni_conf_dir: var("PORTSLICE_E2E_CNI_CONF_DIR", "/etc/cni/net.d"),
            cni_bin_dir: var("PORTSLICE_E2E_CNI_BIN_DIR", "/opt/cni/bin"),
            pin_root: var("PORTSLICE_E2E_PIN_ROOT", "/sys/fs/bpf/portslice"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_the_local_cluster() {
        let s = Settings::from_lookup(|_| None, "/agent".into(), "/repo".into()).unwrap();
        assert_eq!(s.node_ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(s.remote_exec, ["ip", "netns", "exec", "ps-remote"]);
        assert!(s.node_exec.is_empty());
        assert_eq!(s.chart, PathBuf::from("/repo/charts/portslice"));
    }

    #[test]
    fn kind_settings_override_the_defaults() {
        let env = |k: &str| match k {
            "PORTSLICE_E2E_NODE_IP" => Some("172.18.0.2".into()),
            "PORTSLICE_E2E_REMOTE_EXEC" => Some(String::new()),
            "PORTSLICE_E2E_NODE_EXEC" => Some("docker exec kind-control-plane".into()),
            "PORTSLICE_E2E_REMOTE_NAME" => Some("none".into()),
            _ => None,
        };
        let s = Settings::from_lookup(env, "/agent".into(), "/repo".into()).unwrap();
        assert_eq!(s.node_ip, Ipv4Addr::new(172, 18, 0, 2));
        assert!(s.remote_exec.is_empty(), "empty means: run on this machine");
        assert_eq!(s.node_exec, ["docker", "exec", "kind-control-plane"]);
        assert_eq!(s.remote_name, None);
    }

    #[test]
    fn a_bad_address_names_the_variable() {
        let env = |k: &str| (k == "PORTSLICE_E2E_NODE_IP").then(|| "300.1.1.1".to_string());
        let e = Settings::from_lookup(env, "/a".into(), "/r".into()).unwrap_err();
        assert!(e.to_string().contains("PORTSLICE_E2E_NODE_IP"));
    }
}
