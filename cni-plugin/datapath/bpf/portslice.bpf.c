// SPDX-License-Identifier: GPL-2.0-only
/*
 * PortSlice datapath: share the node's addresses (IPv4, IPv6 or both) with slice pods, isolated
 * in port space. A slice owns its ports on every node address.
 *
 *   ps_ingress    uplink and lo ingress: node IP:slice port -> straight into the owning pod.
 *   ps_pod_egress host-side veth ingress (what a pod sends): source-port enforcement, hairpin,
 *                 and FIB forwarding out of the uplink that bypasses host netfilter/conntrack.
 *
 * Everything not addressed to/from a node address is left alone (TC_ACT_OK), so the primary
 * CNI's path, ssh and kubelet never notice us; so is what the host needs for itself on those
 * addresses (neighbour discovery, MLD, echo requests, errors about its own flows). Headers are
 * read with bpf_skb_load_bytes: it copes with non-linear skbs and keeps the verifier happy with
 * variable header lengths.
 *
 * By concern: maps.h (maps, counters, port table), parse.h (both families into one struct pkt,
 * IPv6 extension headers), frags.h (fragments), icmp.h (echo ids, errors), forward.h (FIB).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "portslice_abi.h"
#include "maps.h"
#include "parse.h"
#include "frags.h"
#include "icmp.h"
#include "forward.h"

char LICENSE[] SEC("license") = "GPL";

#define LOOPBACK_IFINDEX_ 1 /* lo is ifindex 1 in every network namespace */

/* --- Allowed sources ------------------------------------------------------------------------ */

/* Is the source of `p` in the allowed-source list of the pod with host ifindex `pod`? One LPM
 * lookup, only for pods whose port slots carry PS_F_SRC_FILTER. The family is part of the key:
 * an IPv6 entry never matches an IPv4 source, nor the other way round. */
static __always_inline int source_allowed(__u32 pod, struct pkt *p)
{
	struct ps_src_key k = {.pod = pod};
	if (p->family == 6) {
		k.prefixlen = 64 + 128;
		k.family = PS_SRC_FAMILY_V6;
	} else {
		k.prefixlen = 64 + 32;
		k.family = PS_SRC_FAMILY_V4;
	}
	__builtin_memcpy(k.addr, p->saddr.b, 16);
	return bpf_map_lookup_elem(&src_allow, &k) != 0;
}

/* A packet for `o`'s ports that its allowed-source list refuses. Counted per pod and node-wide. */
static __always_inline int source_refused(struct ps_port_owner *o, struct pkt *p)
{
	if (!(o->flags & PS_F_SRC_FILTER) || source_allowed(o->host_ifindex, p))
		return 0;
	gstat(PS_G_DROP_SOURCE);
	struct ps_pod_stats *s = pod_stats_of(o->host_ifindex);
	if (s)
		__sync_fetch_and_add(&s->drop_source, 1);
	return 1;
}

/* --- ps_ingress ----------------------------------------------------------------------------- */

SEC("classifier")
int ps_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	union ps_addr nip;
	if (parse(skb, &p) < 0 || !node_addr(p.family, &nip) || !addr_eq(&p.daddr, &nip))
		return TC_ACT_OK;
	/* A routing header with segments left: another hop's packet, the host forwards or drops it. */
	if (p.for_host)
		return TC_ACT_OK;
	if (p.unwalked) {
		gstat(PS_G_V6_CHAIN_LONG);
		return TC_ACT_OK;
	}

	if (p.non_first) {
		__u32 owner, flags;
		if (frag_follow(&p, PS_FRAG_TO_POD, 0, &owner, &flags) < 0)
			return TC_ACT_OK;
		gstat(PS_G_FRAG_STEERED);
		count_rx(owner, skb->len);
		return redirect_into(owner, flags);
	}
	if (p.proto == icmp_proto(p.family))
		return ingress_icmp(skb, &p, &nip);
	if (!p.has_ports)
		return TC_ACT_OK;
	struct ps_port_owner *o = owner_of(p.proto, p.dport);
	if (!o) {
		gstat(PS_G_PASSED);
		return TC_ACT_OK;
	}
	/* lo carries only the node's own packets (from the node address every slice pod shares):
	 * the list filters what comes from outside. */
	if (skb->ifindex != LOOPBACK_IFINDEX_ && source_refused(o, &p))
		return TC_ACT_SHOT;
	if (p.more_frags)
		frag_record(&p, PS_FRAG_TO_POD, 0, o->host_ifindex, o->flags);
	gstat(PS_G_STEERED);
	count_rx(o->host_ifindex, skb->len);
	return redirect_into(o->host_ifindex, o->flags);
}

/* --- ps_pod_egress -------------------------------------------------------------------------- */

/* Is this node-address packet one the pod may send? Counts what it refuses. */
static __always_inline int egress_allowed(struct __sk_buff *skb, struct pkt *p,
					  struct ps_pod_info *pod, __u32 ifindex,
					  const union ps_addr *nip)
{
	struct ps_pod_stats *s = pod_stats_of(ifindex);
	__u8 proto = p->proto;
	if (p->non_first) {
		__u32 owner, flags;
		if (frag_follow(p, PS_FRAG_FROM_POD, ifindex, &owner, &flags) == 0 && owner == ifindex)
			return 1;
		gstat(PS_G_DROP_FRAG);
		if (s)
			__sync_fetch_and_add(&s->drop_other, 1);
		return 0;
	}
	if (p->has_ports) {
		__u8 bit = proto == IPPROTO_TCP ? PS_P_TCP : PS_P_UDP;
		if ((pod->protocols & bit) && p->sport >= pod->port_lo && p->sport <= pod->port_hi) {
			if (p->more_frags)
				frag_record(p, PS_FRAG_FROM_POD, ifindex, ifindex, 0);
			return 1;
		}
		if (s)
			__sync_fetch_and_add(&s->drop_src_port, 1);
		return 0;
	}
	if (proto == icmp_proto(p->family)) {
		__u8 tc[2];
		if (bpf_skb_load_bytes(skb, p->l4_off, tc, sizeof(tc)) < 0)
			return 0;
		int kind = icmp_kind(p->family, tc[0], tc[1]);
		if (kind == ICMP_K_ECHO_REQUEST)
			return egress_echo(skb, p, pod, ifindex) == 0;
		if (kind == ICMP_K_ERROR || kind == ICMP_K_PMTU) {
			if (icmp_error_is_own(skb, p, pod, nip))
				return 1;
			gstat(PS_G_DROP_ICMP);
			if (s)
				__sync_fetch_and_add(&s->drop_icmp_error, 1);
			return 0;
		}
	}
	if (p->unwalked)
		gstat(PS_G_V6_CHAIN_LONG);
	if (s)
		__sync_fetch_and_add(&s->drop_other, 1);
	return 0;
}

SEC("classifier")
int ps_pod_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	union ps_addr nip;
	if (parse(skb, &p) < 0 || !node_addr(p.family, &nip))
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;

	if (!addr_eq(&p.saddr, &nip)) {
		/* The primary CNI's path. Only steer node IP:slice port (matrix row 4); the pod's
		 * private address is a real source, so the slice's allowed-source list applies. */
		if (addr_eq(&p.daddr, &nip) && p.has_ports && !p.for_host) {
			struct ps_port_owner *o = owner_of(p.proto, p.dport);
			if (o && o->host_ifindex != ifindex) {
				if (source_refused(o, &p))
					return TC_ACT_SHOT;
				gstat(PS_G_STEERED);
				count_rx(o->host_ifindex, skb->len);
				return redirect_into(o->host_ifindex, o->flags);
			}
		}
		return TC_ACT_OK;
	}

	struct ps_pod_info *pod = bpf_map_lookup_elem(&pods, &ifindex);
	if (!pod || !(pod->flags & PS_F_SLICE)) {
		gstat(PS_G_DROP_SPOOF);
		return TC_ACT_SHOT;
	}
	/* Neighbour discovery from the node address (the pod resolving its gateway for a packet
	 * it sends from there) and MLD: for the host on this link, untouched. */
	if (icmp6_for_host(skb, &p))
		return TC_ACT_OK;
	if (!egress_allowed(skb, &p, pod, ifindex, &nip))
		return TC_ACT_SHOT;
	struct ps_pod_stats *s = pod_stats_of(ifindex);
	if (s) {
		__sync_fetch_and_add(&s->tx_packets, 1);
		__sync_fetch_and_add(&s->tx_bytes, skb->len);
	}

	if (addr_eq(&p.daddr, &nip) && !p.for_host) {
		/* Hairpin to another slice, or the host's own port (host stack, accept_local). From
		 * the node address, like the host's own packets: not source-filtered (see ps_ingress). */
		if (p.has_ports) {
			struct ps_port_owner *o = owner_of(p.proto, p.dport);
			if (o && o->host_ifindex != ifindex) {
				if (p.more_frags)
					frag_record(&p, PS_FRAG_HAIRPIN, ifindex, o->host_ifindex, o->flags);
				gstat(PS_G_STEERED);
				count_rx(o->host_ifindex, skb->len);
				return redirect_into(o->host_ifindex, o->flags);
			}
		} else if (p.non_first) {
			__u32 owner, flags;
			if (frag_follow(&p, PS_FRAG_HAIRPIN, ifindex, &owner, &flags) == 0)
				return redirect_into(owner, flags);
		}
		gstat(PS_G_PASSED);
		return TC_ACT_OK;
	}
	return forward(skb, &p);
}
