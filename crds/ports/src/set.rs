//! Sets of ports kept as sorted, merged, disjoint ranges: the form pools and the kernel's
//! `ip_local_reserved_ports` (`1,3-5`) take.
use std::fmt;
use std::str::FromStr;

use crate::{PortRange, PortRangeError, parse_list};

/// Sorted, disjoint, non-adjacent ranges (adjacent ones are merged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeSet(Vec<PortRange>);

impl RangeSet {
    pub fn new(ranges: impl IntoIterator<Item = PortRange>) -> Self {
        let mut v: Vec<PortRange> = ranges.into_iter().collect();
        v.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if u32::from(r.start) <= u32::from(last.end) + 1 => {
                    last.end = last.end.max(r.end);
                }
                _ => out.push(r),
            }
        }
        Self(out)
    }

    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of ports in the set.
    pub fn port_count(&self) -> u32 {
        self.0.iter().map(PortRange::len).sum()
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// The ranges of the set that overlap `range`.
    pub fn overlapping<'a>(&'a self, range: &'a PortRange) -> impl Iterator<Item = &'a PortRange> {
        self.0.iter().filter(move |r| r.overlaps(range))
    }

    /// Number of ports of `range` that lie in the set.
    pub fn count_in(&self, range: &PortRange) -> u32 {
        self.overlapping(range)
            .map(|p| u32::from(p.end.min(range.end)) - u32::from(p.start.max(range.start)) + 1)
            .sum()
    }

    /// The set with `other`'s ports added.
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        RangeSet::new(self.0.iter().chain(&other.0).copied())
    }

    /// The set with `other`'s ports taken out.
    pub fn subtract(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        for r in &self.0 {
            let mut pieces = vec![*r];
            for p in &other.0 {
                pieces = pieces
                    .into_iter()
                    .flat_map(|x| {
                        let mut keep = Vec::new();
                        if !x.overlaps(p) {
                            keep.push(x);
                            return keep;
                        }
                        if x.start < p.start {
                            keep.push(PortRange {
                                start: x.start,
                                end: p.start - 1,
                            });
                        }
                        if x.end > p.end {
                            keep.push(PortRange {
                                start: p.end + 1,
                                end: x.end,
                            });
                        }
                        keep
                    })
                    .collect();
            }
            out.extend(pieces);
        }
        RangeSet::new(out)
    }
}

/// As the kernel prints `ip_local_reserved_ports`: `1,3-5` (empty for no ports).
impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl FromStr for RangeSet {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_list(s).map(RangeSet::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(s: &str) -> RangeSet {
        s.parse().unwrap()
    }

    #[test]
    fn merges_overlapping_and_adjacent_ranges_in_order() {
        assert_eq!(set("50-60,10-20,21-25,15-18").to_string(), "10-25,50-60");
        assert_eq!(set("").to_string(), "");
        assert_eq!(set("1-65535").port_count(), 65535);
    }

    #[test]
    fn union_and_subtract_are_what_reserved_ports_need() {
        let before = set("22,8000-8010");
        let pool = set("40000-49999");
        let with = before.union(&pool);
        assert_eq!(with.to_string(), "22,8000-8010,40000-49999");
        assert_eq!(with.subtract(&pool), before);
        assert_eq!(
            set("1-100").subtract(&set("10-20,50")).to_string(),
            "1-9,21-49,51-100"
        );
        assert_eq!(set("10-20").subtract(&set("1-65535")).to_string(), "");
    }

    #[test]
    fn counts_ports_inside_the_set() {
        let s = set("100-199,300-399");
        assert_eq!(s.count_in(&"150-350".parse().unwrap()), 50 + 51);
        assert_eq!(s.count_in(&"200-299".parse().unwrap()), 0);
        assert!(s.contains(300) && !s.contains(299));
    }

    fn ranges() -> impl Strategy<Value = Vec<PortRange>> {
        prop::collection::vec(
            (1u16..=65535, 0u16..500).prop_map(|(s, len)| PortRange {
                start: s,
                end: s.saturating_add(len),
            }),
            0..12,
        )
    }

    proptest! {
        #[test]
        fn a_set_holds_exactly_the_ports_of_its_ranges(v in ranges(), port in 1u16..=65535) {
            let s = RangeSet::new(v.clone());
            prop_assert_eq!(s.contains(port), v.iter().any(|r| r.contains(port)));
            for w in s.ranges().windows(2) {
                prop_assert!(u32::from(w[0].end) + 1 < u32::from(w[1].start), "disjoint, merged, sorted");
            }
            prop_assert_eq!(s.to_string().parse::<RangeSet>().unwrap(), s);
        }

        #[test]
        fn subtract_removes_exactly_the_other_sets_ports(a in ranges(), b in ranges(), port in 1u16..=65535) {
            let (a, b) = (RangeSet::new(a), RangeSet::new(b));
            let d = a.subtract(&b);
            prop_assert_eq!(d.contains(port), a.contains(port) && !b.contains(port));
            prop_assert_eq!(a.union(&b).contains(port), a.contains(port) || b.contains(port));
        }
    }
}
