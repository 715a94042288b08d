//! I/O around the pure install logic: files in the CNI dirs, sysctls, /proc/net.
use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::json;

use super::{DaemonArgs, conflist};

/// The plugin's `type` in the conflist and its file name in the bin dir.
pub const PLUGIN_TYPE: &str = "portslice";

/// Writes through a temp file + rename so a runtime never reads a half-written file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("path without a parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .context("path without a file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.portslice-tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// The entry we append to the node's conflist. The CNI plugin reads `pinRoot`, `nodeIP` and
/// `kubeconfig` from it. The `io.kubernetes.cri.pod-annotations` capability makes containerd pass
/// the pod's annotations in `runtimeConfig`, so ADD learns the slice without reading the Pod.
pub fn plugin_entry(args: &DaemonArgs) -> serde_json::Value {
    let pool = portslice_ports::RangeSet::new(args.pool.iter().copied());
    let mut v = json!({
        "type": PLUGIN_TYPE,
        "pinRoot": args.pin_root,
        "nodeIP": node_ip_field(&args.node_ip),
        "capabilities": { "io.kubernetes.cri.pod-annotations": true },
        // The node's own ports as the cluster has them, so the plugin refuses the same ones.
        "nodeCritical": {
            "apiServerPort": args.api_server_port,
            "nodePortRange": args.node_port_range.to_string(),
            "daemonPorts": daemon_ports(args),
        },
        "pool": pool.to_string(),
        "stateDir": args.state_dir,
    });
    if let Some(k) = &args.kubeconfig_out {
        v["kubeconfig"] = json!(k);
    }
    if let Some(n) = &args.node_name {
        v["nodeName"] = json!(n);
    }
    if !args.cluster_cidrs.is_empty() {
        v["clusterCIDRs"] = json!(args.cluster_cidrs);
    }
    v
}

/// The daemon's own ports on the node: metrics and health, and TCPMUX when served.
pub fn daemon_ports(args: &DaemonArgs) -> Vec<u16> {
    let mut ports = vec![args.metrics_addr.port()];
    if args.tcpmux {
        ports.push(super::tcpmux::PORT);
    }
    ports
}

/// `nodeIP` as the plugin reads it: one address as a string (what every entry before dual stack
/// held, so an IPv4-only node's entry does not change), one of each family as a list.
fn node_ip_field(addrs: &[std::net::IpAddr]) -> serde_json::Value {
    match addrs {
        [one] => json!(one.to_string()),
        many => json!(many.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
    }
}

fn conflist_path(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let names = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    Ok(conflist::pick_file(names).map(|n| dir.join(n)))
}

/// Copies this binary into the CNI bin dir and appends us to the node's conflist. Idempotent.
/// When the primary CNI has not written its config yet, warns and returns Ok(None): the
/// reconcile loop calls this again.
pub fn install_cni(args: &DaemonArgs) -> anyhow::Result<Option<conflist::ChainReport>> {
    let exe = std::env::current_exe().context("finding our own binary")?;
    let target = args.cni_bin_dir.join(PLUGIN_TYPE);
    let ours = std::fs::read(&exe).context("reading our binary")?;
    if std::fs::read(&target).ok().as_ref() != Some(&ours) {
        write_atomic(&target, &ours, 0o755)?;
        tracing::info!(path = %target.display(), "installed CNI plugin binary");
    }
    ensure_conflist_entry(args)
}

/// Appends us to the node's conflist if we are not (or no longer) there, and reports what the
/// conflist holds. Cheap enough for every reconcile: the primary CNI may write or rewrite its
/// config after we started.
pub fn ensure_conflist_entry(args: &DaemonArgs) -> anyhow::Result<Option<conflist::ChainReport>> {
    let Some(path) = conflist_path(&args.cni_conf_dir)? else {
        tracing::warn!(dir = %args.cni_conf_dir.display(), "no CNI config yet (primary CNI not installed?): will retry");
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut list = conflist::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
    let changed = conflist::add_plugin(&mut list, &plugin_entry(args));
    let was_conf = path.extension().is_none_or(|e| e != "conflist");
    if changed || was_conf {
        // A single-plugin .conf cannot chain: it becomes a .conflist with the same stem, and
        // the original is kept as a hidden backup (libcni skips dot files) for uninstall.
        let out = path.with_extension("conflist");
        write_atomic(&out, conflist::render(&list).as_bytes(), 0o644)?;
        if out != path {
            std::fs::rename(
                &path,
                args.cni_conf_dir.join(format!(
                    ".{}.portslice-orig",
                    path.file_name().unwrap_or_default().to_string_lossy()
                )),
            )?;
        }
        tracing::info!(path = %out.display(), "added portslice to the CNI chain");
    }
    let file = path.with_extension("conflist");
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    Ok(Some(conflist::inspect(&name, &list)))
}

/// Undoes [`install_cni`]. Missing pieces are fine.
pub fn uninstall_cni(args: &DaemonArgs) -> anyhow::Result<()> {
    if let Some(path) = conflist_path(&args.cni_conf_dir)? {
        let backup = path.with_extension("conf");
        let backup = args.cni_conf_dir.join(format!(
            ".{}.portslice-orig",
            backup.file_name().unwrap_or_default().to_string_lossy()
        ));
        if backup.exists() {
            // We converted a .conf: put the original back.
            std::fs::rename(&backup, path.with_extension("conf"))?;
            std::fs::remove_file(&path)?;
            return remove_binary(args);
        }
        let text = std::fs::read_to_string(&path)?;
        let mut list = conflist::parse(&text)?;
        if conflist::remove_plugin(&mut list, PLUGIN_TYPE) {
            write_atomic(&path, conflist::render(&list).as_bytes(), 0o644)?;
            tracing::info!(path = %path.display(), "removed portslice from the CNI chain");
        }
    }
    remove_binary(args)
}

fn remove_binary(args: &DaemonArgs) -> anyhow::Result<()> {
    match std::fs::remove_file(args.cni_bin_dir.join(PLUGIN_TYPE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::DaemonArgs,
    }

    #[test]
    fn plugin_entry_carries_the_cluster_cidrs_for_private_routes() {
        let cli = Cli::parse_from([
            "portslice",
            "--uplink",
            "eth0",
            "--node-ip",
            "198.18.0.1",
            "--cluster-cidrs",
            "10.244.0.0/16,10.96.0.0/16",
        ]);
        let v = super::plugin_entry(&cli.args);
        assert_eq!(
            v["clusterCIDRs"],
            serde_json::json!(["10.244.0.0/16", "10.96.0.0/16"])
        );
        assert_eq!(v["nodeIP"], "198.18.0.1");
        // Dual stack: one of each, comma-separated or repeated, as the kubelet's --node-ip.
        for flags in [
            vec!["--node-ip", "198.18.0.1,2001:2::1"],
            vec!["--node-ip", "198.18.0.1", "--node-ip", "2001:2::1"],
        ] {
            let cli = Cli::parse_from(["portslice", "--uplink", "eth0"].into_iter().chain(flags));
            assert_eq!(
                super::plugin_entry(&cli.args)["nodeIP"],
                serde_json::json!(["198.18.0.1", "2001:2::1"])
            );
            assert_eq!(
                cli.args.node_addrs().unwrap().to_string(),
                "198.18.0.1,2001:2::1"
            );
        }
        let cli = Cli::parse_from(["portslice", "--uplink", "eth0", "--node-ip", "2001:2::1"]);
        assert_eq!(super::plugin_entry(&cli.args)["nodeIP"], "2001:2::1");
        let cli = Cli::parse_from([
            "portslice",
            "--uplink",
            "eth0",
            "--node-ip",
            "10.0.0.1,10.0.0.2",
        ]);
        assert!(cli.args.node_addrs().is_err(), "two IPv4 addresses");
        assert_eq!(
            v["capabilities"]["io.kubernetes.cri.pod-annotations"], true,
            "without the capability containerd never passes annotations and every ADD reads the Pod"
        );
    }
}
