use proptest::prelude::*;

use super::*;

fn r(s: u16, e: u16) -> PortRange {
    PortRange { start: s, end: e }
}

fn pool(ranges: &[PortRange]) -> RangeSet {
    Pool::new(
        ranges.iter().copied(),
        portslice_ports::DEFAULT_NODE_PORT_RANGE,
    )
    .expect("valid pool")
    .allocatable(&NodeCritical::default())
}

fn table(ranges: &[PortRange]) -> Allocator<u32> {
    Allocator::new(pool(ranges))
}

#[test]
fn first_fit_hands_out_the_lowest_free_run() {
    let mut t = table(&[r(40000, 40099)]);
    assert_eq!(t.allocate(1, 10), Ok(r(40000, 40009)));
    assert_eq!(t.allocate(2, 10), Ok(r(40010, 40019)));
    assert_eq!(t.allocate(3, 10), Ok(r(40020, 40029)));
    t.release(&2);
    // The hole left by 2 is reused before anything higher.
    assert_eq!(t.allocate(4, 5), Ok(r(40010, 40014)));
    assert_eq!(t.allocate(5, 6), Ok(r(40030, 40035)));
    assert_eq!(t.allocate(6, 5), Ok(r(40015, 40019)));
}

#[test]
fn allocation_is_idempotent_per_slice() {
    let mut t = table(&[r(40000, 40099)]);
    assert_eq!(t.allocate(1, 10), Ok(r(40000, 40009)));
    assert_eq!(t.allocate(1, 10), Ok(r(40000, 40009)));
    assert_eq!(t.len(), 1);
}

#[test]
fn exhaustion_reports_the_largest_free_run() {
    let mut t = table(&[r(40000, 40009)]);
    assert_eq!(t.allocate(1, 4), Ok(r(40000, 40003)));
    assert_eq!(
        t.allocate(2, 7),
        Err(AllocError::Exhausted {
            size: 7,
            largest_free: 6
        })
    );
    assert_eq!(
        t.stats(),
        PoolStats {
            size: 10,
            used: 4,
            free: 6
        }
    );
    t.release(&1);
    assert_eq!(t.allocate(2, 7), Ok(r(40000, 40006)));
}

#[test]
fn the_whole_usable_port_space_is_handed_out_without_the_nodes_own_ports() {
    let mut t = table(&[r(1024, 29999), r(32768, 65535)]);
    let critical = NodeCritical::default();
    let mut key = 0;
    while let Ok(range) = t.allocate(key, 1000) {
        assert!(
            critical.overlap(&range).is_none(),
            "{range} holds a node-critical port"
        );
        key += 1;
    }
    assert_eq!(t.stats().free, t.stats().size - 1000 * key);
    assert!(key > 55, "{key} slices of 1000");
}

#[test]
fn exact_requests_may_lie_anywhere_but_never_overlap() {
    let mut t = table(&[r(40000, 40099)]);
    assert_eq!(t.record(1, r(53, 53)), Ok(r(53, 53)));
    assert_eq!(t.record(2, r(30080, 30080)), Ok(r(30080, 30080)));
    assert_eq!(t.record(3, r(40000, 40004)), Ok(r(40000, 40004)));
    assert_eq!(
        t.record(4, r(40004, 40010)),
        Err(AllocError::Conflict {
            wanted: r(40004, 40010),
            held: r(40000, 40004),
            holder: 3
        })
    );
    // A size request skips the reserved ports.
    assert_eq!(t.allocate(5, 3), Ok(r(40005, 40007)));
    // Only the pool counts in the metrics.
    assert_eq!(t.stats().used, 8);
}

#[test]
fn an_exact_reservation_straddling_the_pool_start_is_skipped() {
    let mut t = table(&[r(40000, 40099)]);
    assert!(t.record(1, r(39990, 40010)).is_ok());
    assert_eq!(t.allocate(2, 5), Ok(r(40011, 40015)));
}

#[test]
fn a_failed_record_keeps_the_previous_range() {
    let mut t = table(&[r(40000, 40099)]);
    t.record(1, r(40000, 40009)).unwrap();
    t.record(2, r(40010, 40019)).unwrap();
    assert!(t.record(1, r(40015, 40020)).is_err());
    assert_eq!(t.get(&1), Some(r(40000, 40009)));
}

#[test]
fn rebuild_lets_the_first_given_keep_overlapping_ports() {
    let (t, rejected) = Allocator::rebuild(
        pool(&[r(40000, 40099)]),
        [(1u32, r(40000, 40009)), (2, r(40005, 40015))],
    );
    assert_eq!(t.get(&1), Some(r(40000, 40009)));
    assert_eq!(t.get(&2), None);
    assert_eq!(rejected.len(), 1);
}

#[test]
fn edge_of_the_port_space_does_not_overflow() {
    let mut t = table(&[r(65530, 65535)]);
    assert_eq!(t.allocate(1, 6), Ok(r(65530, 65535)));
    assert!(matches!(
        t.allocate(2, 1),
        Err(AllocError::Exhausted { .. })
    ));
    assert_eq!(t.allocate(3, 0), Err(AllocError::InvalidSize(0)));
    assert_eq!(t.allocate(3, 70000), Err(AllocError::InvalidSize(70000)));
}

#[derive(Clone, Debug)]
enum Op {
    Allocate(u32, u32),
    Exact(u32, u16, u16),
    Release(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..40, 1u32..300).prop_map(|(k, n)| Op::Allocate(k, n)),
        1 => (0u32..40, 1000u16..3000, 0u16..50).prop_map(|(k, s, n)| Op::Exact(k, s, s + n)),
        3 => (0u32..40).prop_map(Op::Release),
    ]
}

fn pools() -> impl Strategy<Value = Vec<PortRange>> {
    prop::collection::vec(
        (1024u16..3000, 0u16..800).prop_map(|(s, n)| r(s, s.saturating_add(n))),
        1..4,
    )
}

fn assert_disjoint(t: &Allocator<u32>) {
    let ranges: Vec<PortRange> = t.iter().map(|(_, r)| r).collect();
    for w in ranges.windows(2) {
        assert!(w[0].end < w[1].start, "{} and {} overlap", w[0], w[1]);
    }
}

/// Brute force over a port bitmap: is there a run of `size` free pool ports starting below `start`?
fn free_run_below(t: &Allocator<u32>, size: u32, start: u16) -> bool {
    let mut held = vec![false; 65536];
    for (_, r) in t.iter() {
        for p in r.start..=r.end {
            held[usize::from(p)] = true;
        }
    }
    t.pools().iter().any(|pool| {
        let mut run_start = u32::from(pool.start);
        for p in u32::from(pool.start)..=u32::from(pool.end) {
            if held[p as usize] {
                run_start = p + 1;
            } else if p + 1 - run_start >= size {
                return run_start < u32::from(start);
            }
        }
        false
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn ranges_never_overlap_and_first_fit_holds(pools in pools(), ops in prop::collection::vec(op(), 1..120)) {
        let mut t: Allocator<u32> = Allocator::new(pool(&pools));
        for op in ops {
            match op {
                Op::Allocate(k, n) => {
                    let before = t.clone();
                    if let Ok(range) = t.allocate(k, n) {
                        prop_assert_eq!(range.len(), if before.get(&k).is_some() { range.len() } else { n });
                        if before.get(&k).is_none() {
                            prop_assert!(t.pools().iter().any(|p| p.start <= range.start && range.end <= p.end));
                            prop_assert!(!free_run_below(&before, n, range.start), "first fit violated for {}", range);
                        }
                    } else {
                        prop_assert!(!free_run_below(&before, n, u16::MAX));
                    }
                }
                Op::Exact(k, s, e) => { let _ = t.record(k, r(s, e)); }
                Op::Release(k) => { t.release(&k); }
            }
            assert_disjoint(&t);
            let used: u32 = t.iter().map(|(_, r)| RangeSet::new(t.pools().iter().copied()).count_in(&r)).sum();
            prop_assert_eq!(t.stats().used, used);
        }
    }

    #[test]
    fn releasing_everything_leaks_nothing(pools in pools(), ops in prop::collection::vec(op(), 1..120)) {
        let mut t: Allocator<u32> = Allocator::new(pool(&pools));
        for op in ops {
            match op {
                Op::Allocate(k, n) => { let _ = t.allocate(k, n); }
                Op::Exact(k, s, e) => { let _ = t.record(k, r(s, e)); }
                Op::Release(k) => { t.release(&k); }
            }
        }
        for k in 0..40 { t.release(&k); }
        prop_assert!(t.is_empty());
        prop_assert_eq!(t.stats().used, 0);
        // The whole pool is one free run again.
        let biggest = t.pools().iter().map(PortRange::len).max().unwrap();
        prop_assert!(t.allocate(999, biggest).is_ok());
    }

    #[test]
    fn rebuild_from_statuses_gives_the_same_table(pools in pools(), ops in prop::collection::vec(op(), 1..120)) {
        let mut t: Allocator<u32> = Allocator::new(pool(&pools));
        for op in ops {
            match op {
                Op::Allocate(k, n) => { let _ = t.allocate(k, n); }
                Op::Exact(k, s, e) => { let _ = t.record(k, r(s, e)); }
                Op::Release(k) => { t.release(&k); }
            }
        }
        // What a restarted operator sees: every (slice, status.range), in any order.
        let mut statuses: Vec<(u32, PortRange)> = t.iter().map(|(k, r)| (*k, r)).collect();
        statuses.reverse();
        let (rebuilt, rejected) = Allocator::rebuild(pool(&pools), statuses);
        prop_assert!(rejected.is_empty());
        let a: Vec<_> = t.iter().map(|(k, r)| (*k, r)).collect();
        let b: Vec<_> = rebuilt.iter().map(|(k, r)| (*k, r)).collect();
        prop_assert_eq!(a, b);
        prop_assert_eq!(t.stats(), rebuilt.stats());
        // And it keeps allocating exactly like the original would.
        let (mut t2, mut r2) = (t.clone(), rebuilt.clone());
        prop_assert_eq!(t2.allocate(1000, 7), r2.allocate(1000, 7));
    }
}
