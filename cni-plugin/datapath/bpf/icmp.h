/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * ICMP and ICMPv6: echo ids rewritten into a pod's range and steered back by their slot, errors
 * steered by the header they quote, and the rule for the errors a pod may send. Both families
 * share the logic; only the type numbers differ. Included once, by portslice.bpf.c.
 */
#ifndef PORTSLICE_ICMP_H
#define PORTSLICE_ICMP_H

#include <linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"

#define ICMP_ECHOREPLY_ 0
#define ICMP_DEST_UNREACH_ 3
#define ICMP_FRAG_NEEDED_ 4 /* code of ICMP_DEST_UNREACH_ */
#define ICMP_ECHO_ 8
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12
#define ICMP6_DEST_UNREACH_ 1
#define ICMP6_PKT_TOOBIG_ 2
#define ICMP6_TIME_EXCEED_ 3
#define ICMP6_PARAMPROB_ 4
#define ICMP6_ECHO_REQUEST_ 128
#define ICMP6_ECHO_REPLY_ 129
#define ICMP6_MLD_QUERY_ 130  /* 130-132: MLD; 133-137: RS, RA, NS, NA, redirect */
#define ICMP6_REDIRECT_ 137
#define ICMP6_MLD2_REPORT_ 143

/* What an ICMP message is to the datapath. */
enum icmp_kind {
	ICMP_K_OTHER,        /* the host's business (NDP, MLD, echo requests to the node, ...) */
	ICMP_K_ECHO_REQUEST,
	ICMP_K_ECHO_REPLY,
	ICMP_K_ERROR,        /* unreachable, time exceeded, parameter problem */
	ICMP_K_PMTU,         /* fragmentation needed (IPv4), packet too big (IPv6): an error too */
};

/* ICMP's protocol number in `family`. */
static __always_inline __u8 icmp_proto(__u8 family)
{
	return family == 4 ? IPPROTO_ICMP : NH_ICMPV6;
}

static __always_inline int icmp_kind(__u8 family, __u8 type, __u8 code)
{
	if (family == 4) {
		if (type == ICMP_ECHO_)
			return ICMP_K_ECHO_REQUEST;
		if (type == ICMP_ECHOREPLY_)
			return ICMP_K_ECHO_REPLY;
		if (type == ICMP_DEST_UNREACH_)
			return code == ICMP_FRAG_NEEDED_ ? ICMP_K_PMTU : ICMP_K_ERROR;
		if (type == ICMP_TIME_EXCEEDED_ || type == ICMP_PARAMETERPROB_)
			return ICMP_K_ERROR;
		return ICMP_K_OTHER;
	}
	if (type == ICMP6_ECHO_REQUEST_)
		return ICMP_K_ECHO_REQUEST;
	if (type == ICMP6_ECHO_REPLY_)
		return ICMP_K_ECHO_REPLY;
	if (type == ICMP6_PKT_TOOBIG_)
		return ICMP_K_PMTU;
	if (type == ICMP6_DEST_UNREACH_ || type == ICMP6_TIME_EXCEED_ || type == ICMP6_PARAMPROB_)
		return ICMP_K_ERROR;
	return ICMP_K_OTHER;
}

/* Neighbour discovery and MLD a pod sends: the host's own business on the pod's link (resolving
 * the pod's gateway, its multicast memberships), whatever the source. Never forwarded, never
 * steered, never counted as the pod's traffic. */
static __always_inline int icmp6_for_host(struct __sk_buff *skb, struct pkt *p)
{
	if (p->family != 6 || p->proto != NH_ICMPV6 || p->non_first)
		return 0;
	__u8 type;
	if (bpf_skb_load_bytes(skb, p->l4_off, &type, 1) < 0)
		return 0;
	return (type >= ICMP6_MLD_QUERY_ && type <= ICMP6_REDIRECT_) || type == ICMP6_MLD2_REPORT_;
}

/* --- Echo ids ------------------------------------------------------------------------------- */

static __always_inline __u32 echo_key(__u8 family, __u32 id)
{
	return (family == 6 ? PS_ECHO_V6 : PS_ECHO_V4) * 65536 + id;
}

/* The slot of a (rewritten) echo id, if a pod sent a request with it to `remote` lately. The
 * remote is part of the match so that the host's own pings, whose ids may fall in a slice's
 * range, keep their replies from every other remote. */
static __always_inline struct ps_echo_slot *echo_slot(__u8 family, __u16 id_net,
						      const union ps_addr *remote)
{
	__u32 slot = echo_key(family, bpf_ntohs(id_net));
	struct ps_echo_slot *e = bpf_map_lookup_elem(&echo_slots, &slot);
	if (!e || !e->host_ifindex)
		return 0;
	union ps_addr r;
	__builtin_memcpy(r.b, e->remote, 16);
	if (!addr_eq(&r, remote))
		return 0;
	__u32 now = (__u32)(bpf_ktime_get_ns() >> 30);
	if (now - e->stamp > PS_ECHO_TTL_UNITS)
		return 0;
	return e;
}

/* Rewrite an echo request's id into the pod's own range so two pods using the same id towards
 * the same remote cannot collide (ids are not confined by any sysctl), and remember the original
 * in the slot of the rewritten id: a slot of the pod's own range, which no other pod writes. */
static __always_inline int egress_echo(struct __sk_buff *skb, struct pkt *p, struct ps_pod_info *pod,
				       __u32 ifindex)
{
	__u16 orig;
	if (bpf_skb_load_bytes(skb, p->l4_off + 4, &orig, sizeof(orig)) < 0)
		return -1;
	__u32 size = (__u32)pod->port_hi - (__u32)pod->port_lo + 1;
	__u32 id = (__u32)pod->port_lo + (__u32)bpf_ntohs(orig) % size;
	__u32 slot = echo_key(p->family, id);
	struct ps_echo_slot *e = bpf_map_lookup_elem(&echo_slots, &slot);
	if (!e)
		return -1;
	e->host_ifindex = ifindex;
	e->flags = pod->flags;
	e->orig_id = orig;
	__builtin_memcpy(e->remote, p->daddr.b, 16);
	e->stamp = (__u32)(bpf_ktime_get_ns() >> 30);
	__u16 rewritten = bpf_htons((__u16)id);
	if (rewritten == orig)
		return 0;
	/* A 16-bit field of the checksummed data: the same fixup for ICMP and ICMPv6 (whose pseudo
	 * header does not change). */
	if (bpf_l4_csum_replace(skb, p->l4_off + 2, orig, rewritten, sizeof(__u16)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + 4, &rewritten, sizeof(rewritten), 0) < 0 ? -1 : 0;
}

/* --- Ingress -------------------------------------------------------------------------------- */

/* ICMP to the node address: echo replies by their id's slot, errors by the inner header,
 * everything else (neighbour discovery, MLD, echo requests to the node) to the host. */
static __always_inline int ingress_icmp(struct __sk_buff *skb, struct pkt *p,
					const union ps_addr *nip)
{
	__u8 hdr[8];
	if (p->non_first || bpf_skb_load_bytes(skb, p->l4_off, hdr, sizeof(hdr)) < 0)
		return TC_ACT_OK;
	int kind = icmp_kind(p->family, hdr[0], hdr[1]);
	if (kind == ICMP_K_ECHO_REPLY) {
		__u16 id;
		__builtin_memcpy(&id, &hdr[4], 2);
		struct ps_echo_slot *e = echo_slot(p->family, id, &p->saddr);
		if (!e)
			return TC_ACT_OK;
		__u32 ifindex = e->host_ifindex, flags = e->flags;
		__u16 orig = e->orig_id;
		if (bpf_l4_csum_replace(skb, p->l4_off + 2, id, orig, sizeof(__u16)) < 0)
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, p->l4_off + 4, &orig, sizeof(orig), 0) < 0)
			return TC_ACT_SHOT;
		gstat(PS_G_ICMP_STEERED);
		count_rx(ifindex, skb->len);
		return redirect_into(ifindex, flags);
	}
	if (kind != ICMP_K_ERROR && kind != ICMP_K_PMTU)
		return TC_ACT_OK;
	/* The quoted header is the packet the node address sent: its source port names the pod.
	 * Errors are not source-filtered: routers on the path must reach the pod (PMTU). */
	struct inner in = {};
	if (parse_inner(skb, p->family, p->l4_off + 8, &in) < 0 || !addr_eq(&in.saddr, nip) ||
	    in.non_first)
		return TC_ACT_OK;
	if (in.proto == IPPROTO_TCP || in.proto == IPPROTO_UDP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, in.l4_off, ports, sizeof(ports)) < 0)
			return TC_ACT_OK;
		struct ps_port_owner *o = owner_of(in.proto, bpf_ntohs(ports[0]));
		if (!o)
			return TC_ACT_OK;
		gstat(PS_G_ICMP_STEERED);
		count_rx(o->host_ifindex, skb->len);
		return redirect_into(o->host_ifindex, o->flags);
	}
	if (in.proto == icmp_proto(p->family)) {
		/* An error about one of our echo requests (traceroute -I): quoted id is the rewritten one. */
		__u16 qid[2];
		if (bpf_skb_load_bytes(skb, in.l4_off + 4, qid, sizeof(qid)) < 0)
			return TC_ACT_OK;
		struct ps_echo_slot *e = echo_slot(p->family, qid[0], &in.daddr);
		if (!e)
			return TC_ACT_OK;
		gstat(PS_G_ICMP_STEERED);
		return redirect_into(e->host_ifindex, e->flags);
	}
	return TC_ACT_OK;
}

/* --- Pod egress ----------------------------------------------------------------------------- */

/* May the pod send this ICMP error? Only about a packet it received: the quoted header must be a
 * first (or only) fragment to the node address, on the pod's own ports and protocols (for ICMP,
 * an echo with an id of its range), sent by the host the error goes back to. Anything else would
 * let a pod forge errors about the host's or other pods' flows (e.g. port unreachable tearing
 * down their connections).
 * Never frag-needed (IPv4) or packet too big (IPv6), not even about its own flow: the remote
 * caches a path MTU per destination address, and the node address is everyone's, so one pod
 * would lower it for every slice and the host. A pod is an endpoint; only routers on the path
 * send those. */
static __always_inline int icmp_error_is_own(struct __sk_buff *skb, struct pkt *p,
					     struct ps_pod_info *pod, const union ps_addr *nip)
{
	__u8 type_code[2];
	if (bpf_skb_load_bytes(skb, p->l4_off, type_code, sizeof(type_code)) < 0)
		return 0;
	if (icmp_kind(p->family, type_code[0], type_code[1]) != ICMP_K_ERROR)
		return 0;
	struct inner in = {};
	if (parse_inner(skb, p->family, p->l4_off + 8, &in) < 0)
		return 0;
	if (!addr_eq(&in.daddr, nip) || !addr_eq(&in.saddr, &p->daddr))
		return 0;
	if (in.non_first)
		return 0; /* a non-first fragment names no port */
	if (in.proto == IPPROTO_TCP || in.proto == IPPROTO_UDP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, in.l4_off, ports, sizeof(ports)) < 0)
			return 0;
		__u8 bit = in.proto == IPPROTO_TCP ? PS_P_TCP : PS_P_UDP;
		__u16 dport = bpf_ntohs(ports[1]);
		return (pod->protocols & bit) && dport >= pod->port_lo && dport <= pod->port_hi;
	}
	if (in.proto == icmp_proto(p->family)) {
		__u8 h[6];
		if (bpf_skb_load_bytes(skb, in.l4_off, h, sizeof(h)) < 0)
			return 0;
		int kind = icmp_kind(p->family, h[0], h[1]);
		if (kind != ICMP_K_ECHO_REQUEST && kind != ICMP_K_ECHO_REPLY)
			return 0;
		__u16 id = ((__u16)h[4] << 8) | h[5];
		return id >= pod->port_lo && id <= pod->port_hi;
	}
	return 0;
}

#endif
