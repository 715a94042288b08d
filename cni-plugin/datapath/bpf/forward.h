/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Forwarding a slice pod's packets straight out of the uplink, IPv4 and IPv6: the host's
 * netfilter and conntrack never see the flow, so there is no per-flow state and no half-seen
 * connection for kube-proxy's INVALID rule. Included once, by portslice.bpf.c.
 */
#ifndef PORTSLICE_FORWARD_H
#define PORTSLICE_FORWARD_H

#include <linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"

#define AF_INET_ 2
#define AF_INET6_ 10
/* Traffic class and flow label of the first IPv6 header word, as bpf_fib_lookup wants them. */
#define IPV6_FLOWINFO_MASK_ bpf_htonl(0x0FFFFFFF)

/* TTL or hop limit minus one, as a router would: IPv4 with an incremental header checksum fix,
 * IPv6 has none. */
static __always_inline int decrement_ttl(struct __sk_buff *skb, struct pkt *p)
{
	__u8 ttl = p->ttl - 1;
	if (p->family == 6)
		return bpf_skb_store_bytes(skb, ETH_HLEN_ + __builtin_offsetof(struct ipv6hdr, hop_limit),
					   &ttl, 1, 0);
	/* TTL and protocol share a 16-bit word of the checksum. */
	__u8 ob[2] = {p->ttl, p->proto}, nb[2] = {ttl, p->proto};
	__u16 old, new;
	__builtin_memcpy(&old, ob, 2);
	__builtin_memcpy(&new, nb, 2);
	if (bpf_l3_csum_replace(skb, ETH_HLEN_ + __builtin_offsetof(struct iphdr, check), old, new,
				sizeof(__u16)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN_ + __builtin_offsetof(struct iphdr, ttl), &ttl, 1, 0);
}

static __always_inline int forward(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	fib.l4_protocol = p->proto;
	/* tot_len = 0: a GSO super-packet's length would otherwise read as "fragmentation needed". */
	fib.tot_len = 0;
	fib.ifindex = skb->ingress_ifindex;
	if (p->family == 6) {
		fib.family = AF_INET6_;
		fib.flowinfo = p->flowinfo & IPV6_FLOWINFO_MASK_;
		__builtin_memcpy(fib.ipv6_src, p->saddr.b, 16);
		__builtin_memcpy(fib.ipv6_dst, p->daddr.b, 16);
	} else {
		fib.family = AF_INET_;
		fib.tos = p->tos;
		fib.ipv4_src = p->saddr.w[0];
		fib.ipv4_dst = p->daddr.w[0];
	}
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK; /* let the host stack deal with it (and send any ICMP error) */
	if (p->ttl <= 1)
		return TC_ACT_OK; /* host stack sends time exceeded */
	if (decrement_ttl(skb, p) < 0)
		return TC_ACT_SHOT;
	gstat(PS_G_FORWARDED);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0);
}

#endif
