//! The allocation table: which slice holds which ports. Pure data, no Kubernetes in it, so every
//! rule (never overlap, first fit, exact reservations, rebuild after restart) is unit- and
//! property-tested on its own. The controller feeds it from the API server's statuses.
mod priority;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

pub use portslice_ports::{NodeCritical, Pool, PoolError, PortRange, RangeSet};
pub use priority::{Age, Claim, older_claim};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError<K> {
    #[error("no free range of {size} ports left in the pool (largest free range: {largest_free})")]
    Exhausted { size: u32, largest_free: u32 },
    #[error("ports {wanted} overlap {held}, which is already held")]
    Conflict {
        wanted: PortRange,
        held: PortRange,
        holder: K,
    },
    #[error("a slice needs between 1 and 65535 ports, not {0}")]
    InvalidSize(u32),
}

/// Ports in the pool: total, held by some slice, free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub size: u32,
    pub used: u32,
    pub free: u32,
}

/// A rebuilt table and the allocations it refused (they overlapped an earlier one).
pub type Rebuilt<K> = (Allocator<K>, Vec<(K, AllocError<K>)>);

/// The table. `K` identifies a slice (the controller uses namespace/name/uid).
#[derive(Clone, Debug)]
pub struct Allocator<K> {
    /// Where `size` requests are served from: the pool less the node-critical ports.
    pool: RangeSet,
    /// Held ranges by first port. Invariant: disjoint, so ends are sorted too.
    by_start: BTreeMap<u16, (u16, K)>,
    by_key: HashMap<K, PortRange>,
    /// Ports of held ranges that lie in the pool, kept up to date for the metrics.
    used_in_pool: u32,
}

impl<K: Clone + Eq + Hash> Allocator<K> {
    /// An empty table over the allocatable ports ([`Pool::allocatable`]: a validated pool less
    /// the node-critical ports).
    pub fn new(pool: RangeSet) -> Self {
        Self {
            pool,
            by_start: BTreeMap::new(),
            by_key: HashMap::new(),
            used_in_pool: 0,
        }
    }

    /// Rebuilds the table from existing allocations (the statuses), in the order given: callers
    /// pass the oldest slices first so that, should two statuses ever overlap, the older keeps
    /// its ports. Returns the table and the allocations that could not be recorded.
    pub fn rebuild(pool: RangeSet, held: impl IntoIterator<Item = (K, PortRange)>) -> Rebuilt<K> {
        let mut table = Self::new(pool);
        let mut rejected = Vec::new();
        for (key, range) in held {
            if let Err(e) = table.record(key.clone(), range) {
                rejected.push((key, e));
            }
        }
        (table, rejected)
    }

    pub fn pools(&self) -> &[PortRange] {
        self.pool.ranges()
    }

    pub fn get(&self, key: &K) -> Option<PortRange> {
        self.by_key.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, PortRange)> {
        self.by_start
            .iter()
            .map(|(&start, (end, k))| (k, PortRange { start, end: *end }))
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            size: self.pool.port_count(),
            used: self.used_in_pool,
            free: self.pool.port_count() - self.used_in_pool,
        }
    }

    /// The held range overlapping `range`, if any, with its holder.
    pub fn overlapping(&self, range: &PortRange) -> Option<(PortRange, &K)> {
        // The held range starting last at or before range.end is the only candidate: every
        // earlier one ends before it starts (disjointness).
        let (&start, (end, key)) = self.by_start.range(..=range.end).next_back()?;
        (*end >= range.start).then_some((PortRange { start, end: *end }, key))
    }

    /// Records that `key` holds exactly `range` (an existing status, or an exact-port request).
    /// Idempotent; a different range held by the same key is replaced. Fails, changing nothing,
    /// when another key holds any of the ports.
    pub fn record(&mut self, key: K, range: PortRange) -> Result<PortRange, AllocError<K>> {
        if range.is_empty() || range.start == 0 {
            return Err(AllocError::InvalidSize(0));
        }
        if self.get(&key) == Some(range) {
            return Ok(range);
        }
        let previous = self.release(&key);
        if let Some((held, holder)) = self.overlapping(&range) {
            let err = AllocError::Conflict {
                wanted: range,
                held,
                holder: holder.clone(),
            };
            if let Some(prev) = previous {
                self.insert(key, prev);
            }
            return Err(err);
        }
        self.insert(key, range);
        Ok(range)
    }

    /// Gives `key` the first free run of `size` ports in the pool (lowest port first), or the
    /// range it already holds. First fit keeps the free space in few large pieces at the top.
    pub fn allocate(&mut self, key: K, size: u32) -> Result<PortRange, AllocError<K>> {
        if size == 0 || size > 65535 {
            return Err(AllocError::InvalidSize(size));
        }
        if let Some(held) = self.get(&key) {
            return Ok(held);
        }
        let mut largest_free = 0;
        for pool in self.pool.ranges() {
            let mut cursor = u32::from(pool.start);
            let pool_end = u32::from(pool.end);
            // A held range (e.g. an exact reservation) may straddle the pool's start.
            if let Some((held, _)) = self.overlapping(&PortRange {
                start: pool.start,
                end: pool.start,
            }) {
                cursor = u32::from(held.end) + 1;
            }
            for (&start, (end, _)) in self.by_start.range(pool.start..=pool.end) {
                let start = u32::from(start);
                if start > cursor {
                    let gap = start - cursor;
                    if gap >= size {
                        return Ok(self.take(key, cursor, size));
                    }
                    largest_free = largest_free.max(gap);
                }
                cursor = cursor.max(u32::from(*end) + 1);
            }
            if cursor <= pool_end {
                let gap = pool_end - cursor + 1;
                if gap >= size {
                    return Ok(self.take(key, cursor, size));
                }
                largest_free = largest_free.max(gap);
            }
        }
        Err(AllocError::Exhausted { size, largest_free })
    }

    /// Frees whatever `key` holds.
    pub fn release(&mut self, key: &K) -> Option<PortRange> {
        let range = self.by_key.remove(key)?;
        self.by_start.remove(&range.start);
        self.used_in_pool -= self.pool.count_in(&range);
        Some(range)
    }

    fn take(&mut self, key: K, start: u32, size: u32) -> PortRange {
        // start + size - 1 <= pool end <= 65535, so both fit in u16.
        let range = PortRange {
            start: start as u16,
            end: (start + size - 1) as u16,
        };
        self.insert(key, range);
        range
    }

    fn insert(&mut self, key: K, range: PortRange) {
        self.used_in_pool += self.pool.count_in(&range);
        self.by_start.insert(range.start, (range.end, key.clone()));
        self.by_key.insert(key, range);
    }
}
