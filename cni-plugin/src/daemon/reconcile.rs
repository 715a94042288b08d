//! Pure reconcile decision: which stored attachments are stale.
use portslice_datapath::PodAttachment;

/// Container ids to remove: not in `live` when a live list is given, and in any case those
/// whose host veth no longer exists (the pod's netns is gone, so is the pod).
pub fn stale(
    pods: &[PodAttachment],
    live: Option<&[String]>,
    interface_exists: impl Fn(u32) -> bool,
) -> Vec<String> {
    pods.iter()
        .filter(|p| {
            live.is_some_and(|l| !l.contains(&p.container_id))
                || !interface_exists(p.host_veth_ifindex)
        })
        .map(|p| p.container_id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn pod(id: &str, ifindex: u32) -> PodAttachment {
        PodAttachment {
            container_id: id.into(),
            host_veth_ifindex: ifindex,
            pod_private_ip: Ipv4Addr::LOCALHOST,
            slice: None,
        }
    }

    #[test]
    fn gone_interfaces_and_unlisted_pods_are_stale() {
        let pods = [pod("a", 1), pod("b", 2), pod("c", 3)];
        assert_eq!(stale(&pods, None, |i| i != 2), vec!["b"]);
        let live = vec!["a".to_string()];
        assert_eq!(stale(&pods, Some(&live), |_| true), vec!["b", "c"]);
        assert!(stale(&pods, None, |_| true).is_empty());
    }
}
