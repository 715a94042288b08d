//! The slice index: the allocation table kept in step with the API server's PortSlice statuses.
//!
//! It is fed every watch event *before* the controller reconciles anything, so when a slice is
//! reconciled the table already reflects every status the operator has seen. Like linkerd's
//! policy index it holds no client: the I/O layer feeds it objects and asks it questions.
//!
//! Safety rules (why a restarted or second operator never hands out an overlapping range):
//! - nothing is allocated before the first complete list (`synced`);
//! - a range handed out stays in the table until the slice is gone from the API server: a
//!   failed status write keeps it reserved (the write may have landed), and the slice retries
//!   with the same range;
//! - after a watch re-list, entries the list no longer shows are kept and reported as suspects,
//!   to be dropped only once a direct GET proves the slice is gone.
use std::collections::{HashMap, HashSet};

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use portslice_crds::{PortRange, PortSlice};

use crate::allocator::{Age, AllocError, Allocator, Claim, PoolStats, RangeSet, older_claim};
use crate::policy::Usage;

/// Identity of one PortSlice object (a recreated slice with the same name is a different one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SliceId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl SliceId {
    pub fn of(obj: &PortSlice) -> Self {
        Self {
            namespace: obj.namespace().unwrap_or_default(),
            name: obj.name_any(),
            uid: obj.uid().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for SliceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub fn age_of(obj: &PortSlice) -> Age {
    Age {
        created_unix: obj
            .creation_timestamp()
            .map(|t| t.0.as_second())
            .unwrap_or(i64::MAX),
        tiebreak: format!(
            "{}/{}/{}",
            obj.namespace().unwrap_or_default(),
            obj.name_any(),
            obj.uid().unwrap_or_default()
        ),
    }
}

/// Why an exact-port request cannot be granted now.
#[derive(Debug, PartialEq, Eq)]
pub enum ExactRefusal {
    /// Another slice holds some of the ports.
    Held { holder: SliceId, held: PortRange },
    /// An older slice asks for some of the same ports and goes first.
    OlderClaim { claimant: SliceId, ports: PortRange },
}

/// What a watch event changed, for the I/O layer to act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Ports were freed: slices waiting for space should retry.
    pub freed: bool,
    /// Statuses that overlap a range held by another slice (never expected; see module docs).
    pub overlaps: Vec<(SliceId, PortRange, SliceId)>,
    /// Slices the latest re-list did not show: verify they are gone before freeing their ports.
    pub suspects: Vec<SliceId>,
}

/// One listed slice: identity, age, status range, and exact ports it still asks for.
type Listed = (SliceId, Age, Option<PortRange>, Option<PortRange>);

pub struct SliceIndex {
    table: Allocator<SliceId>,
    /// The allocatable ports (pool less node-critical ports), for rebuilds.
    pool: RangeSet,
    synced: bool,
    /// Objects of a list in progress (between watcher Init and InitDone).
    relist: Option<Vec<Listed>>,
    /// Unallocated exact-port requests of live slices: the queue for "older wins".
    claims: HashMap<SliceId, Claim<SliceId>>,
    /// Slices that wait for space; woken when ports are freed.
    waiting: HashSet<ObjectRef<PortSlice>>,
}

impl SliceIndex {
    pub fn new(pool: RangeSet) -> Self {
        Self {
            table: Allocator::new(pool.clone()),
            pool,
            synced: false,
            relist: None,
            claims: HashMap::new(),
            waiting: HashSet::new(),
        }
    }

    /// True once a complete list of slices has been seen.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn stats(&self) -> (PoolStats, usize) {
        (self.table.stats(), self.table.len())
    }

    pub fn range_of(&self, id: &SliceId) -> Option<PortRange> {
        self.table.get(id)
    }

    /// What `namespace` holds, `except` one slice (the one being decided). O(slices): asked only
    /// when a quota applies to the namespace.
    pub fn usage(&self, namespace: &str, except: &SliceId) -> Usage {
        let mut u = Usage::default();
        for (id, range) in self.table.iter() {
            if id.namespace == namespace && id != except {
                u.ports += range.len();
                u.slices += 1;
            }
        }
        u
    }

    /// Feeds one watch event.
    pub fn observe(&mut self, event: &watcher::Event<PortSlice>) -> Observed {
        match event {
            watcher::Event::Apply(obj) => self.apply(obj),
            watcher::Event::Delete(obj) => self.delete(obj),
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                Observed::default()
            }
            watcher::Event::InitApply(obj) => {
                if let Some(buf) = self.relist.as_mut() {
                    let ports = obj
                        .spec
                        .ports
                        .filter(|_| obj.meta().deletion_timestamp.is_none());
                    buf.push((SliceId::of(obj), age_of(obj), status_range(obj), ports));
                }
                Observed::default()
            }
            watcher::Event::InitDone => self.init_done(),
        }
    }

    fn apply(&mut self, obj: &PortSlice) -> Observed {
        let id = SliceId::of(obj);
        self.update_claim(obj, &id);
        let mut seen = Observed::default();
        if let Some(range) = status_range(obj)
            && let Err(AllocError::Conflict { holder, .. }) = self.table.record(id.clone(), range)
        {
            seen.overlaps.push((id, range, holder));
        }
        // A status without a range says nothing: our own write may still be in flight, and a
        // range once handed out is only freed when the slice is gone.
        seen
    }

    fn delete(&mut self, obj: &PortSlice) -> Observed {
        let id = SliceId::of(obj);
        self.claims.remove(&id);
        self.waiting.remove(&ObjectRef::from_obj(obj));
        Observed {
            freed: self.table.release(&id).is_some(),
            ..Observed::default()
        }
    }

    fn init_done(&mut self) -> Observed {
        let listed = self.relist.take().unwrap_or_default();
        let mut seen = Observed::default();
        // Oldest first: if two statuses ever overlapped, the older slice keeps its ports.
        let mut held: Vec<(&SliceId, &Age, PortRange)> = listed
            .iter()
            .filter_map(|(id, age, r, _)| r.map(|r| (id, age, r)))
            .collect();
        held.sort_by(|a, b| a.1.cmp(b.1));
        let (mut table, rejected) = Allocator::rebuild(
            self.pool.clone(),
            held.iter().map(|(id, _, r)| ((*id).clone(), *r)),
        );
        for (id, err) in rejected {
            if let (AllocError::Conflict { holder, .. }, Some(r)) =
                (err, held.iter().find(|h| *h.0 == id).map(|h| h.2))
            {
                seen.overlaps.push((id, r, holder));
            }
        }
        // Keep what we handed out that the list does not show yet (writes in flight) and what
        // the list no longer shows (deleted while we were not watching?) until proven gone.
        let listed_ids: HashSet<&SliceId> = listed.iter().map(|(id, ..)| id).collect();
        for (id, range) in self.table.iter() {
            if table.get(id).is_some() {
                continue;
            }
            if table.record(id.clone(), range).is_err() {
                seen.overlaps.push((id.clone(), range, id.clone()));
            }
            if !listed_ids.contains(id) {
                seen.suspects.push(id.clone());
            }
        }
        self.table = table;
        self.claims = listed
            .iter()
            .filter(|(_, _, r, ports)| r.is_none() && ports.is_some())
            .filter_map(|(id, age, _, ports)| {
                ports.map(|p| {
                    (
                        id.clone(),
                        Claim {
                            key: id.clone(),
                            age: age.clone(),
                            ports: p,
                        },
                    )
                })
            })
            .collect();
        let first_sync = !self.synced;
        self.synced = true;
        // After a re-list anything may have been freed; on the first sync nobody waits yet.
        seen.freed = !first_sync;
        seen
    }

    fn update_claim(&mut self, obj: &PortSlice, id: &SliceId) {
        match obj.spec.ports {
            Some(ports)
                if status_range(obj).is_none() && obj.meta().deletion_timestamp.is_none() =>
            {
                self.claims.insert(
                    id.clone(),
                    Claim {
                        key: id.clone(),
                        age: age_of(obj),
                        ports,
                    },
                );
            }
            _ => {
                self.claims.remove(id);
            }
        }
    }

    /// Hands `id` the first free run of `size` pool ports (or what it already holds).
    pub fn allocate(&mut self, id: &SliceId, size: u32) -> Result<PortRange, AllocError<SliceId>> {
        self.table.allocate(id.clone(), size)
    }

    /// Reserves exact ports for `id`, unless another slice holds them or an older slice asks
    /// for them too.
    pub fn reserve_exact(
        &mut self,
        id: &SliceId,
        age: Age,
        ports: PortRange,
    ) -> Result<PortRange, ExactRefusal> {
        if self.table.get(id) == Some(ports) {
            return Ok(ports);
        }
        let me = Claim {
            key: id.clone(),
            age,
            ports,
        };
        if let Some(older) = older_claim(&me, self.claims.values()) {
            return Err(ExactRefusal::OlderClaim {
                claimant: older.key.clone(),
                ports: older.ports,
            });
        }
        match self.table.record(id.clone(), ports) {
            Ok(r) => {
                self.claims.remove(id);
                Ok(r)
            }
            Err(AllocError::Conflict { holder, held, .. }) => {
                Err(ExactRefusal::Held { holder, held })
            }
            // `ports` is a valid PortRange; record refuses nothing else.
            Err(_) => Err(ExactRefusal::Held {
                holder: id.clone(),
                held: ports,
            }),
        }
    }

    /// Forgets a slice whose absence from the API server was verified with a direct GET.
    pub fn forget(&mut self, id: &SliceId) -> bool {
        self.claims.remove(id);
        self.table.release(id).is_some()
    }

    pub fn wait(&mut self, slice: ObjectRef<PortSlice>) {
        self.waiting.insert(slice);
    }

    pub fn stop_waiting(&mut self, slice: &ObjectRef<PortSlice>) {
        self.waiting.remove(slice);
    }

    /// Everyone waiting for space, to be reconciled again.
    pub fn waiters(&self) -> Vec<ObjectRef<PortSlice>> {
        self.waiting.iter().cloned().collect()
    }
}

fn status_range(obj: &PortSlice) -> Option<PortRange> {
    obj.status.as_ref().and_then(|s| s.range)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;
    use portslice_crds::{PortSliceSpec, PortSliceStatus, Protocol};

    use super::*;

    fn slice(name: &str, created: i64) -> PortSlice {
        PortSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                creation_timestamp: Some(Time(
                    k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
                )),
                ..ObjectMeta::default()
            },
            spec: PortSliceSpec {
                protocols: vec![Protocol::TCP],
                ..PortSliceSpec::of_size(10)
            },
            status: None,
        }
    }

    fn exact(name: &str, created: i64, s: u16, e: u16) -> PortSlice {
        let mut p = slice(name, created);
        p.spec = PortSliceSpec::exact(PortRange { start: s, end: e });
        p
    }

    fn holding(mut p: PortSlice, s: u16, e: u16) -> PortSlice {
        p.status = Some(PortSliceStatus {
            range: Some(PortRange { start: s, end: e }),
            ..Default::default()
        });
        p
    }

    fn index() -> SliceIndex {
        let pool = portslice_ports::Pool::new(
            [PortRange {
                start: 40000,
                end: 40099,
            }],
            portslice_ports::DEFAULT_NODE_PORT_RANGE,
        )
        .expect("a valid pool");
        SliceIndex::new(pool.allocatable(&portslice_ports::NodeCritical::default()))
    }

    fn sync(ix: &mut SliceIndex, objs: &[PortSlice]) -> Observed {
        ix.observe(&watcher::Event::Init);
        for o in objs {
            ix.observe(&watcher::Event::InitApply(o.clone()));
        }
        ix.observe(&watcher::Event::InitDone)
    }

    #[test]
    fn is_not_synced_until_the_first_list_is_complete() {
        let mut ix = index();
        ix.observe(&watcher::Event::Init);
        ix.observe(&watcher::Event::InitApply(holding(
            slice("a", 1),
            40000,
            40009,
        )));
        assert!(!ix.synced());
        ix.observe(&watcher::Event::InitDone);
        assert!(ix.synced());
        // The listed status is respected: the next allocation goes after it.
        assert_eq!(
            ix.allocate(&SliceId::of(&slice("b", 2)), 10),
            Ok(PortRange {
                start: 40010,
                end: 40019
            })
        );
    }

    #[test]
    fn ports_are_freed_only_when_the_slice_is_gone() {
        let mut ix = index();
        sync(&mut ix, &[]);
        let a = slice("a", 1);
        let id = SliceId::of(&a);
        assert_eq!(
            ix.allocate(&id, 10),
            Ok(PortRange {
                start: 40000,
                end: 40009
            })
        );
        // An event without the range (our write in flight) keeps the reservation.
        assert_eq!(
            ix.observe(&watcher::Event::Apply(a.clone())),
            Observed::default()
        );
        assert_eq!(
            ix.range_of(&id),
            Some(PortRange {
                start: 40000,
                end: 40009
            })
        );
        let seen = ix.observe(&watcher::Event::Delete(holding(a, 40000, 40009)));
        assert!(seen.freed);
        assert_eq!(ix.range_of(&id), None);
    }

    #[test]
    fn the_older_exact_request_goes_first() {
        let mut ix = index();
        let (old, new) = (exact("old", 1, 5060, 5061), exact("new", 2, 5061, 5061));
        sync(&mut ix, &[new.clone(), old.clone()]);
        let refusal = ix.reserve_exact(
            &SliceId::of(&new),
            age_of(&new),
            PortRange {
                start: 5061,
                end: 5061,
            },
        );
        assert_eq!(
            refusal,
            Err(ExactRefusal::OlderClaim {
                claimant: SliceId::of(&old),
                ports: PortRange {
                    start: 5060,
                    end: 5061
                }
            })
        );
        assert!(
            ix.reserve_exact(
                &SliceId::of(&old),
                age_of(&old),
                PortRange {
                    start: 5060,
                    end: 5061
                }
            )
            .is_ok()
        );
        let refusal = ix.reserve_exact(
            &SliceId::of(&new),
            age_of(&new),
            PortRange {
                start: 5061,
                end: 5061,
            },
        );
        assert!(matches!(refusal, Err(ExactRefusal::Held { .. })));
    }

    #[test]
    fn a_relist_keeps_unlisted_ranges_as_suspects() {
        let mut ix = index();
        let a = slice("a", 1);
        sync(&mut ix, &[]);
        ix.allocate(&SliceId::of(&a), 10).unwrap();
        let seen = sync(&mut ix, &[]);
        assert_eq!(seen.suspects, vec![SliceId::of(&a)]);
        assert!(ix.range_of(&SliceId::of(&a)).is_some());
        assert!(ix.forget(&SliceId::of(&a)));
    }

    #[test]
    fn overlapping_statuses_are_reported_and_the_older_keeps_its_ports() {
        let mut ix = index();
        let (a, b) = (
            holding(slice("a", 1), 40000, 40009),
            holding(slice("b", 2), 40005, 40014),
        );
        let seen = sync(&mut ix, &[b.clone(), a.clone()]);
        assert_eq!(seen.overlaps.len(), 1);
        assert_eq!(seen.overlaps[0].0, SliceId::of(&b));
        assert_eq!(
            ix.range_of(&SliceId::of(&a)),
            Some(PortRange {
                start: 40000,
                end: 40009
            })
        );
    }
}
