//! Deterministic order between slices that want the same exact ports: the older slice wins.
use portslice_crds::PortRange;

/// How old a slice is. Ordered oldest first: creation time (seconds, as the API server records
/// it), then a stable tie-break (namespace/name/uid) for slices created in the same second.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Age {
    pub created_unix: i64,
    pub tiebreak: String,
}

/// An exact-port request that is not allocated yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim<K> {
    pub key: K,
    pub age: Age,
    pub ports: PortRange,
}

/// The oldest *other* pending claim that overlaps `me` and is older than it, if any: that slice
/// gets the ports first, whatever order the operator happens to see the two in.
pub fn older_claim<'a, K: PartialEq + 'a>(
    me: &Claim<K>,
    pending: impl IntoIterator<Item = &'a Claim<K>>,
) -> Option<&'a Claim<K>> {
    pending
        .into_iter()
        .filter(|c| c.key != me.key && c.ports.overlaps(&me.ports) && c.age < me.age)
        .min_by(|a, b| a.age.cmp(&b.age))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(key: &str, created: i64, s: u16, e: u16) -> Claim<String> {
        Claim {
            key: key.into(),
            age: Age {
                created_unix: created,
                tiebreak: key.into(),
            },
            ports: PortRange { start: s, end: e },
        }
    }

    #[test]
    fn the_older_overlapping_claim_wins() {
        let a = claim("a", 10, 5060, 5061);
        let b = claim("b", 20, 5061, 5070);
        let c = claim("c", 5, 6000, 6000);
        let all = [a.clone(), b.clone(), c.clone()];
        assert_eq!(older_claim(&b, &all), Some(&a));
        assert_eq!(older_claim(&a, &all), None);
        assert_eq!(older_claim(&c, &all), None);
    }

    #[test]
    fn same_second_is_broken_by_name() {
        let a = claim("a", 10, 53, 53);
        let b = claim("b", 10, 53, 53);
        let all = [b.clone(), a.clone()];
        assert_eq!(older_claim(&b, &all), Some(&a));
        assert_eq!(older_claim(&a, &all), None);
    }
}
