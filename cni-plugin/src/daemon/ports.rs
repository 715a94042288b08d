//! Pure port-list logic of the node: `net.ipv4.ip_local_reserved_ports` editing and the host
//! listeners found in `/proc/net/{tcp,udp}`. Range-set algebra and the pool rules themselves live
//! in `portslice-ports`, shared with the operator.
use portslice_ports::{PortRangeError, RangeSet};

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

/// Which of `ports` fall inside `set`, sorted and deduplicated.
pub fn inside(mut ports: Vec<u16>, set: &RangeSet) -> Vec<u16> {
    ports.retain(|p| set.contains(*p));
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// `ip_local_reserved_ports` with `pool` added; what was reserved before stays reserved.
pub fn reserved_with(current: &str, pool: &RangeSet) -> Result<String, PortRangeError> {
    Ok(current.parse::<RangeSet>()?.union(pool).to_string())
}

/// `ip_local_reserved_ports` with `pool` taken out (uninstall).
pub fn reserved_without(current: &str, pool: &RangeSet) -> Result<String, PortRangeError> {
    Ok(current.parse::<RangeSet>()?.subtract(pool).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(s: &str) -> RangeSet {
        s.parse().unwrap()
    }

    #[test]
    fn reserved_merge_keeps_existing() {
        assert_eq!(
            reserved_with("", &set("40000-49999")).unwrap(),
            "40000-49999"
        );
        assert_eq!(
            reserved_with("22,40000-40010", &set("40005-50000")).unwrap(),
            "22,40000-50000"
        );
        assert_eq!(
            reserved_with("39999", &set("40000-40001")).unwrap(),
            "39999-40001"
        );
        assert!(reserved_with("garbage", &set("1")).is_err());
    }

    #[test]
    fn reserved_without_takes_only_the_pool() {
        assert_eq!(
            reserved_without("22,40000-50000", &set("40000-49999")).unwrap(),
            "22,50000"
        );
        assert_eq!(
            reserved_without("40000-49999", &set("40000-49999")).unwrap(),
            ""
        );
        assert_eq!(reserved_without("1-10", &set("4-5")).unwrap(), "1-3,6-10");
    }

    #[test]
    fn parses_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st\n   0: 00000000:9C40 00000000:0000 0A 0\n   1: 0100007F:0016 0100007F:C350 01 0\n";
        assert_eq!(listening_ports(tcp, true), vec![40000]);
        let udp = "  sl  local_address rem_address   st\n   0: 00000000:0035 00000000:0000 07 0\n";
        assert_eq!(listening_ports(udp, false), vec![53]);
        let tcp6 = "h\n 0: 00000000000000000000000000000000:9C41 00000000000000000000000000000000:0000 0A\n";
        assert_eq!(
            inside(listening_ports(tcp6, true), &set("40000-40001")),
            vec![40001]
        );
    }

    proptest! {
        #[test]
        fn with_then_without_restores_unrelated(pool_start in 40000u16..41000, len in 0u16..100) {
            let pool = RangeSet::new([portslice_ports::PortRange { start: pool_start, end: pool_start + len }]);
            let added = reserved_with("22,8080", &pool).unwrap();
            prop_assert_eq!(reserved_without(&added, &pool).unwrap(), "22,8080");
        }
    }
}
