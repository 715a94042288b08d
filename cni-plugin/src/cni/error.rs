//! The spec's error result and the codes we return.
//!
//! Errors go to STDOUT as JSON (that is where libcni reads them) with a non-zero exit; logs go to
//! stderr. Codes 0-99 are the spec's well-known codes, 100+ are ours.

use serde::{Deserialize, Serialize};

/// Well-known and plugin-specific CNI error codes.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables, like CNI_COMMAND or CNI_CONTAINERID.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure, e.g. reading stdin.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (malformed JSON).
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config: a field is missing or has a bad value.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later: a transient condition, e.g. the API server did not answer in time.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (e.g. the datapath is not loaded).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;

    /// The pod names a PortSlice that does not exist.
    pub const SLICE_NOT_FOUND: u32 = 100;
    /// The PortSlice exists but the operator has not allocated it a range yet.
    pub const SLICE_NOT_ALLOCATED: u32 = 101;
    /// Another pod of the same slice already runs on this node.
    pub const SLIVER_EXISTS: u32 = 102;
    /// The API server answered with an error (other than not-found).
    pub const API_ERROR: u32 = 103;
    /// Setting up the pod's network namespace failed.
    pub const NETNS_SETUP: u32 = 104;
    /// The eBPF datapath refused or failed the attachment.
    pub const DATAPATH: u32 = 105;
    /// CHECK found the wiring missing or changed.
    pub const CHECK_FAILED: u32 = 106;
    /// The node address from the config is not usable with the previous plugin's result.
    pub const PREV_RESULT: u32 = 107;
    /// The slice holds the node's own ports (sshd, the kubelet, the API server, NodePorts, ...).
    pub const FORBIDDEN_PORTS: u32 = 108;
    /// A host process on this node listens on a port of the slice.
    pub const HOST_PORT_IN_USE: u32 = 109;
}

/// The spec's error result. `cniVersion` is the version the caller asked for (or our newest
/// when the request could not be read far enough to know it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg} (CNI code {code}){}", details_suffix(.details))]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(": {details}")
    }
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: super::version::LATEST.to_string(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Reports the error in the version the caller speaks.
    pub fn in_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_string();
        self
    }

    /// The JSON written to stdout.
    pub fn to_json(&self) -> String {
        // Serialising a struct of strings and an integer cannot fail; fall back to a hand-built
        // object anyway rather than panic in the one path that must always print something.
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{}","code":{},"msg":"error"}}"#,
                self.cni_version, self.code
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_matches_the_spec_shape() {
        let e = CniError::new(code::DECODE_FAILURE, "bad json").in_version("1.0.0");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 6);
        assert_eq!(v["msg"], "bad json");
        assert!(v.get("details").is_none(), "empty details are omitted");
        let e = e.with_details("line 1");
        assert!(e.to_json().contains(r#""details":"line 1""#));
        assert_eq!(e.to_string(), "bad json (CNI code 6): line 1");
    }
}
