//! Pure port-list logic: the pool, `net.ipv4.ip_local_reserved_ports` merging, and the host
//! listeners found in `/proc/net/{tcp,udp}`.
use portslice_crds::{NODE_PORT_RANGE, PortRange};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("pool {0:?}: {1}")]
    Parse(String, String),
    #[error("pool range {0} overlaps the Kubernetes NodePort range {NODE_PORT_RANGE}")]
    NodePort(PortRange),
    #[error("pool is empty")]
    Empty,
}

/// Parses a comma-separated list of ranges (`40000-49999,53`), sorted and merged.
pub fn parse_ranges(s: &str) -> Result<Vec<PortRange>, String> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        v.push(part.parse::<PortRange>().map_err(|e| e.to_string())?);
    }
    Ok(merge(v))
}

/// Parses the pool and refuses the NodePort range.
pub fn parse_pool(s: &str) -> Result<Vec<PortRange>, PoolError> {
    let v = parse_ranges(s).map_err(|e| PoolError::Parse(s.to_string(), e))?;
    if v.is_empty() {
        return Err(PoolError::Empty);
    }
    if let Some(r) = v.iter().find(|r| r.overlaps(&NODE_PORT_RANGE)) {
        return Err(PoolError::NodePort(*r));
    }
    Ok(v)
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge(mut v: Vec<PortRange>) -> Vec<PortRange> {
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
    out
}

/// Formats like the kernel prints the sysctl (`1,3-5`).
pub fn format_ranges(v: &[PortRange]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The reserved-ports value with the pool added; what was reserved before stays reserved.
pub fn reserved_with(current: &str, pool: &[PortRange]) -> Result<String, String> {
    let mut v = parse_ranges(current)?;
    v.extend_from_slice(pool);
    Ok(format_ranges(&merge(v)))
}

/// The reserved-ports value with the pool taken out (uninstall).
pub fn reserved_without(current: &str, pool: &[PortRange]) -> Result<String, String> {
    let mut out = Vec::new();
    for r in parse_ranges(current)? {
        let mut pieces = vec![r];
        for p in pool {
            pieces = pieces
                .into_iter()
                .flat_map(|x| {
                    if !x.overlaps(p) {
                        return vec![x];
                    }
                    let mut keep = Vec::new();
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
    Ok(format_ranges(&merge(out)))
}

/// Local ports of listening TCP sockets / bound UDP sockets in a `/proc/net/{tcp,udp}[6]` table.
pub fn listening_ports(table: &str, tcp: bool) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let state = f.get(3)?;
            // 0A = TCP_LISTEN; UDP sockets are 07 (TCP_CLOSE) when merely bound.
            if tcp && *state != "0A" {
                return None;
            }
            let port = local.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// Which of `ports` fall inside the pool, sorted and deduplicated.
pub fn in_pool(mut ports: Vec<u16>, pool: &[PortRange]) -> Vec<u16> {
    ports.retain(|p| pool.iter().any(|r| r.contains(*p)));
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Port-table bitmap of a pool: which ports it holds (used to cross-check the reserved list).
pub fn bitmap(pool: &[PortRange]) -> Vec<bool> {
    let mut b = vec![false; 65536];
    for r in pool {
        for p in r.start..=r.end {
            b[usize::from(p)] = true;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(a: u16, b: u16) -> PortRange {
        PortRange { start: a, end: b }
    }

    #[test]
    fn pool_refuses_nodeport_and_empty() {
        assert_eq!(parse_pool("40000-59999").unwrap(), vec![r(40000, 59999)]);
        assert!(matches!(
            parse_pool("29000-30000"),
            Err(PoolError::NodePort(_))
        ));
        assert_eq!(parse_pool(""), Err(PoolError::Empty));
        assert!(matches!(parse_pool("a-b"), Err(PoolError::Parse(..))));
    }

    #[test]
    fn reserved_merge_keeps_existing() {
        assert_eq!(
            reserved_with("", &[r(40000, 49999)]).unwrap(),
            "40000-49999"
        );
        assert_eq!(
            reserved_with("22,40000-40010", &[r(40005, 50000)]).unwrap(),
            "22,40000-50000"
        );
        assert_eq!(
            reserved_with("39999", &[r(40000, 40001)]).unwrap(),
            "39999-40001"
        );
    }

    #[test]
    fn reserved_without_takes_only_the_pool() {
        assert_eq!(
            reserved_without("22,40000-50000", &[r(40000, 49999)]).unwrap(),
            "22,50000"
        );
        assert_eq!(
            reserved_without("40000-49999", &[r(40000, 49999)]).unwrap(),
            ""
        );
        assert_eq!(reserved_without("1-10", &[r(4, 5)]).unwrap(), "1-3,6-10");
    }

    #[test]
    fn parses_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st\n   0: 00000000:9C40 00000000:0000 0A 0\n   1: 0100007F:0016 0100007F:C350 01 0\n";
        assert_eq!(listening_ports(tcp, true), vec![40000]);
        let udp = "  sl  local_address rem_address   st\n   0: 00000000:0035 00000000:0000 07 0\n";
        assert_eq!(listening_ports(udp, false), vec![53]);
        let tcp6 = "h\n 0: 00000000000000000000000000000000:9C41 00000000000000000000000000000000:0000 0A\n";
        assert_eq!(
            in_pool(listening_ports(tcp6, true), &[r(40000, 40001)]),
            vec![40001]
        );
    }

    proptest! {
        #[test]
        fn merge_preserves_membership(ranges in proptest::collection::vec((1u16..2000, 0u16..50), 0..8)) {
            let v: Vec<PortRange> = ranges.iter().map(|&(a, l)| r(a, a.saturating_add(l))).collect();
            let merged = merge(v.clone());
            let (b1, b2) = (bitmap(&v), bitmap(&merged));
            prop_assert_eq!(b1, b2);
            for w in merged.windows(2) {
                prop_assert!(u32::from(w[0].end) + 1 < u32::from(w[1].start));
            }
            let text = format_ranges(&merged);
            prop_assert_eq!(parse_ranges(&text).unwrap(), merged);
        }

        #[test]
        fn with_then_without_restores_unrelated(pool_start in 40000u16..41000, len in 0u16..100) {
            let pool = [r(pool_start, pool_start + len)];
            let added = reserved_with("22,8080", &pool).unwrap();
            prop_assert_eq!(reserved_without(&added, &pool).unwrap(), "22,8080");
        }
    }
}
