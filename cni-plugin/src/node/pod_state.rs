//! What ADD changed in a pod that only ADD knew: the sysctls' previous values. Kept in a file per
//! container under the state dir (tmpfs by default: a reboot takes the pods' netns and this
//! together), read back by DEL to put every sysctl back, and removed with it.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// `<state dir>/pods/<container id>`.
pub fn path(state_dir: &Path, container_id: &str) -> PathBuf {
    state_dir.join("pods").join(container_id)
}

/// Writes `saved` (sysctl path, value) pairs, one `path=value` line each.
pub fn save(
    state_dir: &Path,
    container_id: &str,
    saved: &[(PathBuf, String)],
) -> anyhow::Result<()> {
    let text: String = saved
        .iter()
        .map(|(p, v)| format!("{}={v}\n", p.display()))
        .collect();
    let file = path(state_dir, container_id);
    crate::daemon::install::write_atomic(&file, text.as_bytes(), 0o600)
        .with_context(|| format!("saving the pod's sysctls in {}", file.display()))
}

/// What [`save`] wrote; empty when there is no record (a pod ADD never wired, or DEL twice).
pub fn load(state_dir: &Path, container_id: &str) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let file = path(state_dir, container_id);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    Ok(parse(&text))
}

pub fn remove(state_dir: &Path, container_id: &str) -> anyhow::Result<()> {
    let file = path(state_dir, container_id);
    match std::fs::remove_file(&file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", file.display()))
        }
        _ => Ok(()),
    }
}

fn parse(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(p, _)| p.starts_with("/proc/sys/"))
        .map(|(p, v)| (PathBuf::from(p), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_sysctls_round_trip_and_foreign_paths_are_ignored() {
        let dir = std::env::temp_dir().join(format!("portslice-state-{}", std::process::id()));
        let saved = vec![
            (
                PathBuf::from("/proc/sys/net/ipv4/ip_local_port_range"),
                "32768 60999".to_string(),
            ),
            (
                PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/arp_announce"),
                "0".to_string(),
            ),
        ];
        save(&dir, "cid1", &saved).unwrap();
        assert_eq!(load(&dir, "cid1").unwrap(), saved);
        remove(&dir, "cid1").unwrap();
        assert!(load(&dir, "cid1").unwrap().is_empty());
        remove(&dir, "cid1").unwrap();
        assert!(
            parse("/etc/passwd=x\n").is_empty(),
            "only sysctls are ever written back"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
