use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An inclusive range of ports, `start..=end`.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
// The same CEL rule kube's `x_kube(validation)` writes, without depending on kube.
#[schemars(extend("x-kubernetes-validations" = [{
    "message": "ports.start must be less than or equal to ports.end",
    "rule": "self.start <= self.end"
}]))]
pub struct PortRange {
    /// First port of the range (inclusive).
    #[schemars(range(min = 1, max = 65535))]
    pub start: u16,
    /// Last port of the range (inclusive).
    #[schemars(range(min = 1, max = 65535))]
    pub end: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    #[error("port range {0:?} is not of the form START-END or PORT")]
    Syntax(String),
    #[error("port {0:?} is not a number between 1 and 65535")]
    Port(String),
    #[error("port range {start}-{end} is empty: start must not be above end")]
    Empty { start: u16, end: u16 },
}

impl PortRange {
    /// Builds a range, refusing an empty one and port 0.
    pub fn new(start: u16, end: u16) -> Result<Self, PortRangeError> {
        if start == 0 {
            return Err(PortRangeError::Port("0".into()));
        }
        if start > end {
            return Err(PortRangeError::Empty { start, end });
        }
        Ok(Self { start, end })
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    /// Never true for a range built by [`PortRange::new`]; present for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.start > self.end
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    /// Parses `40000-49999` or a single port `53`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let port = |p: &str| -> Result<u16, PortRangeError> {
            p.trim()
                .parse::<u16>()
                .map_err(|_| PortRangeError::Port(p.trim().to_string()))
        };
        match s.split_once('-') {
            Some((a, b)) => PortRange::new(port(a)?, port(b)?),
            None if !s.is_empty() => {
                let p = port(s)?;
                PortRange::new(p, p)
            }
            None => Err(PortRangeError::Syntax(s.to_string())),
        }
    }
}

/// Parses a comma-separated list of ranges, `40000-44999,50000-54999` or `53,80-89`: the one
/// syntax of every pool flag and chart value. Empty items are skipped.
pub fn parse_list(s: &str) -> Result<Vec<PortRange>, PortRangeError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_single_ports() {
        assert_eq!(
            "40000-49999".parse(),
            Ok(PortRange {
                start: 40000,
                end: 49999
            })
        );
        assert_eq!(" 53 ".parse(), Ok(PortRange { start: 53, end: 53 }));
        assert_eq!(
            "5-4".parse::<PortRange>(),
            Err(PortRangeError::Empty { start: 5, end: 4 })
        );
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("70000".parse::<PortRange>().is_err());
        assert!("".parse::<PortRange>().is_err());
    }

    #[test]
    fn lists_are_comma_separated() {
        assert_eq!(
            parse_list("40000-44999, 50000-54999,53,"),
            Ok(vec![
                PortRange::new(40000, 44999).unwrap(),
                PortRange::new(50000, 54999).unwrap(),
                PortRange::new(53, 53).unwrap()
            ])
        );
        assert_eq!(parse_list(""), Ok(vec![]));
        assert!(parse_list("40000-44999,x").is_err());
    }

    #[test]
    fn overlap_is_symmetric_and_inclusive() {
        let a = PortRange::new(10, 20).unwrap();
        let b = PortRange::new(20, 30).unwrap();
        let c = PortRange::new(21, 30).unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
        assert_eq!(a.len(), 11);
        assert_eq!(a.to_string(), "10-20");
    }
}
