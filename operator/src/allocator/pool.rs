//! Pool normalisation: the ranges the operator may hand out for `size` requests.
use portslice_crds::{NODE_PORT_RANGE, PortRange};

/// Ports below this are privileged; never handed out unless a slice asks for them exactly.
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error(
        "the pool {0:?} is empty once the NodePort range {NODE_PORT_RANGE} and ports below \
         {FIRST_UNPRIVILEGED_PORT} are taken out"
    )]
    Empty(Vec<String>),
}

/// Sorts and merges the configured ranges and cuts out the NodePort range and the privileged
/// ports, so that no `size` request can ever land there.
pub fn normalize(ranges: &[PortRange]) -> Result<Vec<PortRange>, PoolError> {
    let mut cut: Vec<(u32, u32)> = Vec::new();
    for r in ranges {
        let (start, end) = (
            u32::from(r.start).max(u32::from(FIRST_UNPRIVILEGED_PORT)),
            u32::from(r.end),
        );
        let (ns, ne) = (
            u32::from(NODE_PORT_RANGE.start),
            u32::from(NODE_PORT_RANGE.end),
        );
        for (s, e) in [(start, end.min(ns - 1)), (start.max(ne + 1), end)] {
            if s <= e {
                cut.push((s, e));
            }
        }
    }
    cut.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(cut.len());
    for (s, e) in cut {
        match merged.last_mut() {
            Some(last) if s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    if merged.is_empty() {
        return Err(PoolError::Empty(
            ranges.iter().map(ToString::to_string).collect(),
        ));
    }
    // Both bounds came from u16 values, so they fit back.
    Ok(merged
        .into_iter()
        .map(|(s, e)| PortRange {
            start: s as u16,
            end: e as u16,
        })
        .collect())
}

/// Number of ports of `range` that lie in the (normalised, disjoint) pool.
pub fn ports_in_pool(pools: &[PortRange], range: &PortRange) -> u32 {
    pools
        .iter()
        .filter(|p| p.overlaps(range))
        .map(|p| u32::from(p.end.min(range.end)) - u32::from(p.start.max(range.start)) + 1)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u16, e: u16) -> PortRange {
        PortRange { start: s, end: e }
    }

    #[test]
    fn cuts_out_node_ports_and_privileged_ports() {
        assert_eq!(
            normalize(&[r(1, 65535)]),
            Ok(vec![r(1024, 29999), r(32768, 65535)])
        );
        assert_eq!(normalize(&[r(31000, 40000)]), Ok(vec![r(32768, 40000)]));
    }

    #[test]
    fn merges_and_sorts_ranges() {
        assert_eq!(
            normalize(&[
                r(50000, 50010),
                r(40000, 40010),
                r(40005, 40020),
                r(40021, 40030)
            ]),
            Ok(vec![r(40000, 40030), r(50000, 50010)])
        );
    }

    #[test]
    fn refuses_a_pool_that_is_only_node_ports() {
        assert!(normalize(&[r(30000, 32767), r(80, 443)]).is_err());
        assert!(normalize(&[]).is_err());
    }

    #[test]
    fn counts_ports_inside_the_pool() {
        let pools = [r(100, 199), r(300, 399)];
        assert_eq!(ports_in_pool(&pools, &r(150, 350)), 50 + 51);
        assert_eq!(ports_in_pool(&pools, &r(200, 299)), 0);
    }
}
