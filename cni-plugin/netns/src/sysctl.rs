//! Per-netns sysctls. `/proc/sys/net` resolves to the netns of the thread that *opens* the file,
//! so these must be called from the thread that entered the right netns.
//!
//! Keys are paths, not dotted names: an interface name may contain a dot (`eth0.100`), which a
//! dotted name would turn into a directory separator.

use std::path::{Path, PathBuf};

use super::NetnsError;

/// A sysctl, by its path under `/proc/sys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(PathBuf);

impl Key {
    /// A key whose dotted name has no interface in it, e.g. `net.ipv4.ip_local_port_range`.
    pub fn named(dotted: &str) -> Self {
        Self(PathBuf::from("/proc/sys").join(dotted.replace('.', "/")))
    }

    /// `net.<family>.conf.<ifname>.<leaf>`, with the interface name kept whole.
    pub fn interface(family: &str, ifname: &str, leaf: &str) -> Self {
        Self(
            Path::new("/proc/sys/net")
                .join(family)
                .join("conf")
                .join(ifname)
                .join(leaf),
        )
    }

    /// `net.ipv4.ip_local_port_range`: the ephemeral ports of the netns (IPv6 uses it too).
    pub fn local_port_range() -> Self {
        Self::named("net.ipv4.ip_local_port_range")
    }

    /// `net.ipv4.ip_unprivileged_port_start`: the lowest port a process may bind unprivileged.
    pub fn unprivileged_port_start() -> Self {
        Self::named("net.ipv4.ip_unprivileged_port_start")
    }

    /// A key by its path, as [`Self::path`] gave it (e.g. read back from a saved record).
    pub fn from_path(path: PathBuf) -> Self {
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The dotted name, for messages.
    pub fn name(&self) -> String {
        let rel = self.0.strip_prefix("/proc/sys").unwrap_or(&self.0);
        rel.iter()
            .map(|c| c.to_string_lossy())
            .collect::<Vec<_>>()
            .join(".")
    }
}

pub fn read(key: &Key) -> Result<String, NetnsError> {
    std::fs::read_to_string(key.path())
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .map_err(|source| NetnsError::Sysctl {
            what: format!("reading sysctl {}", key.name()),
            source,
        })
}

pub fn write(key: &Key, value: &str) -> Result<(), NetnsError> {
    std::fs::write(key.path(), value).map_err(|source| NetnsError::Sysctl {
        what: format!("setting sysctl {}={value}", key.name()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_with_dots_stay_one_path_component() {
        let k = Key::interface("ipv4", "eth0.100", "arp_announce");
        assert_eq!(
            k.path(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/arp_announce")
        );
        assert_eq!(k.name(), "net.ipv4.conf.eth0.100.arp_announce");
        assert_eq!(
            Key::local_port_range().path(),
            Path::new("/proc/sys/net/ipv4/ip_local_port_range")
        );
    }

    #[test]
    fn this_netns_can_be_read() {
        let range = read(&Key::local_port_range()).expect("readable without privileges");
        assert_eq!(range.split(' ').count(), 2, "{range}");
        let lo = read(&Key::interface("ipv4", "lo", "forwarding"));
        assert!(lo.is_ok(), "{lo:?}");
    }
}
