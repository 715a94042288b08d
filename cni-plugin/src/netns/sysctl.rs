//! Per-netns sysctls. `/proc/sys/net` resolves to the netns of the thread that *opens* the file,
//! so these must be called from the thread that entered the pod's netns.

use std::path::PathBuf;

use super::NetnsError;

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

pub fn read(key: &str) -> Result<String, NetnsError> {
    std::fs::read_to_string(path(key))
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .map_err(|source| NetnsError::Sysctl {
            what: format!("reading sysctl {key}"),
            source,
        })
}

pub fn write(key: &str, value: &str) -> Result<(), NetnsError> {
    std::fs::write(path(key), value).map_err(|source| NetnsError::Sysctl {
        what: format!("setting sysctl {key}={value}"),
        source,
    })
}

pub const LOCAL_PORT_RANGE: &str = "net.ipv4.ip_local_port_range";
pub const UNPRIVILEGED_PORT_START: &str = "net.ipv4.ip_unprivileged_port_start";
