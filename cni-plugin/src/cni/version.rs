//! CNI spec versions we speak and what each allows.
//!
//! 0.3.0 and 0.3.1 are what kindnet, Flannel and Calico write into their conflists, so a chained
//! plugin that refuses them breaks every pod on the node. They share 0.4.0's result format
//! (`version` in `ips`); they have no CHECK and no `prevResult` on DEL, which is why DEL works
//! from our own pinned state alone. 1.0.0 drops `version` from `ips`; 1.1.0 adds GC and STATUS.

use super::error::{CniError, code};

/// Versions reported by VERSION, oldest first (the spec's convention).
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest version we speak; used for replies when the request's version is unknown.
pub const LATEST: &str = "1.1.0";

/// A version we speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V030,
    V031,
    V040,
    V100,
    V110,
}

impl Version {
    pub fn parse(text: &str) -> Result<Self, CniError> {
        match text {
            "0.3.0" => Ok(Self::V030),
            "0.3.1" => Ok(Self::V031),
            "0.4.0" => Ok(Self::V040),
            "1.0.0" => Ok(Self::V100),
            "1.1.0" => Ok(Self::V110),
            other => Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("CNI version {other:?} is not supported"),
            )
            .with_details(format!("portslice speaks {}", SUPPORTED.join(", ")))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V030 => "0.3.0",
            Self::V031 => "0.3.1",
            Self::V040 => "0.4.0",
            Self::V100 => "1.0.0",
            Self::V110 => "1.1.0",
        }
    }

    /// Result `ips` entries carry `"version": "4"` before 1.0.0.
    pub fn ips_have_version(self) -> bool {
        self < Self::V100
    }

    /// CHECK arrived in 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V040
    }

    /// GC and STATUS arrived in 1.1.0.
    pub fn has_gc_and_status(self) -> bool {
        self >= Self::V110
    }
}

/// The reply to VERSION.
pub fn version_reply(request_version: Option<&str>) -> serde_json::Value {
    // The reply is written in the version the caller used when we speak it, else our newest.
    let reply_version = request_version
        .and_then(|v| Version::parse(v).ok())
        .map_or(LATEST, Version::as_str);
    serde_json::json!({ "cniVersion": reply_version, "supportedVersions": SUPPORTED })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_and_refuses_others_with_code_1() {
        assert_eq!(Version::parse("1.0.0").unwrap(), Version::V100);
        assert_eq!(Version::parse("0.3.1").unwrap(), Version::V031);
        for bad in ["0.2.0", "0.1.0", "2.0.0", "", "1.0", "0.3"] {
            assert_eq!(
                Version::parse(bad).unwrap_err().code,
                code::INCOMPATIBLE_VERSION,
                "{bad}"
            );
        }
        for v in SUPPORTED {
            assert_eq!(Version::parse(v).unwrap().as_str(), v, "round trip");
        }
    }

    #[test]
    fn version_features_follow_the_spec() {
        assert!(Version::V030.ips_have_version() && Version::V031.ips_have_version());
        assert!(Version::V040.ips_have_version());
        assert!(!Version::V100.ips_have_version());
        assert!(!Version::V031.has_check() && Version::V040.has_check());
        assert!(!Version::V100.has_gc_and_status());
        assert!(Version::V110.has_gc_and_status());
    }

    #[test]
    fn version_reply_lists_everything_we_speak() {
        let v = version_reply(Some("0.3.1"));
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_reply(Some("9.9.9"))["cniVersion"], LATEST);
        assert_eq!(version_reply(None)["cniVersion"], LATEST);
    }
}
