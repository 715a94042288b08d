//! CNI spec versions we speak and what each allows.
//!
//! 0.4.0 (CHECK, `version` in `ips`), 1.0.0 (Debian's reference plugins stop here, so a chain
//! behind them runs at 1.0.0) and 1.1.0 (GC, STATUS). Older versions have no `prevResult` for DEL
//! and no CHECK; a chained plugin cannot honour them, so they are refused with code 1.

use super::error::{CniError, code};

/// Versions reported by VERSION, oldest first (the spec's convention).
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The newest version we speak; used for replies when the request's version is unknown.
pub const LATEST: &str = "1.1.0";

/// A version we speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V040,
    V100,
    V110,
}

impl Version {
    pub fn parse(text: &str) -> Result<Self, CniError> {
        match text {
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
            Self::V040 => "0.4.0",
            Self::V100 => "1.0.0",
            Self::V110 => "1.1.0",
        }
    }

    /// Result `ips` entries carry `"version": "4"` before 1.0.0.
    pub fn ips_have_version(self) -> bool {
        self < Self::V100
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
        for bad in ["0.3.1", "0.2.0", "2.0.0", "", "1.0"] {
            assert_eq!(
                Version::parse(bad).unwrap_err().code,
                code::INCOMPATIBLE_VERSION,
                "{bad}"
            );
        }
    }

    #[test]
    fn version_features_follow_the_spec() {
        assert!(Version::V040.ips_have_version());
        assert!(!Version::V100.ips_have_version());
        assert!(!Version::V100.has_gc_and_status());
        assert!(Version::V110.has_gc_and_status());
    }

    #[test]
    fn version_reply_lists_everything_we_speak() {
        let v = version_reply(Some("1.0.0"));
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_reply(Some("9.9.9"))["cniVersion"], LATEST);
        assert_eq!(version_reply(None)["cniVersion"], LATEST);
    }
}
