/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Parsing: what the programs learn about one IPv4 or IPv6 packet (struct pkt), the node's address
 * of the packet's family, and the header an ICMP error quotes (struct inner). Both families land
 * in the same struct, so steering, enforcement and fragment tracking are written once.
 *
 * IPv6 extension headers (hop-by-hop, routing, destination options, fragment) are walked with a
 * fixed bound, PS_MAX_EXT_HEADERS; a longer chain is marked `unwalked` and never steered. A
 * routing header with segments left means the packet is for another hop after this one, not for
 * the node address: it is marked `for_host` and left to the host stack.
 */
#ifndef PORTSLICE_PARSE_H
#define PORTSLICE_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"

#define ETH_HLEN_ 14
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff
#define IP6_MF 0x0001
#define IP6_OFFMASK 0xfff8 /* the offset in 8-byte units, already shifted left by 3 */

/* IPv6 next-header values the walk knows (linux/in6.h hides some behind libc guards). */
#define NH_HOPOPTS 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_ICMPV6 58
#define NH_DSTOPTS 60

/* An address of either family: IPv4 in w[0], the rest zero. */
union ps_addr {
	__u32 w[4];
	__u8 b[16];
};

static __always_inline int addr_eq(const union ps_addr *a, const union ps_addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* The node's address of `family` (4 or 6) into `out`; 0 when the node shares none of it. */
static __always_inline int node_addr(__u8 family, union ps_addr *out)
{
	__u32 zero = 0;
	struct ps_node_config *cfg = bpf_map_lookup_elem(&node_config, &zero);
	if (!cfg)
		return 0;
	if (family == 4) {
		out->w[0] = cfg->node_ip;
		out->w[1] = out->w[2] = out->w[3] = 0;
		return cfg->node_ip != 0;
	}
	__builtin_memcpy(out->b, cfg->node_ip6, 16);
	return (out->w[0] | out->w[1] | out->w[2] | out->w[3]) != 0;
}

/* What the parser learnt about one packet. */
struct pkt {
	union ps_addr saddr;
	union ps_addr daddr;
	__u32 l4_off;      /* offset of the transport header */
	__u32 payload_len; /* bytes of the datagram's fragmentable part in this packet */
	__u32 frag_end;    /* offset of this fragment's end within the fragmentable part */
	__u32 frag_id;     /* IPv4 id or IPv6 Fragment id, network order */
	__u32 flowinfo;    /* IPv6: traffic class + flow label, network order (FIB lookup) */
	__u16 sport;       /* host order; valid when has_ports */
	__u16 dport;
	__u8 family;     /* 4 or 6 */
	__u8 proto;      /* transport protocol (IPv6: after the extension headers) */
	__u8 frag_proto; /* what names the datagram in every fragment: IPv4 protocol, IPv6 Fragment
			  * header's next header */
	__u8 ttl;        /* TTL or hop limit */
	__u8 tos;        /* IPv4 */
	__u8 has_ports;  /* TCP/UDP first (or only) fragment */
	__u8 non_first;  /* fragment offset != 0: no L4 header */
	__u8 more_frags; /* MF set */
	__u8 for_host;   /* IPv6 routing header with segments left: not for the node address yet */
	__u8 unwalked;   /* IPv6 chain longer than PS_MAX_EXT_HEADERS: proto is not the transport */
};

static __always_inline int load_ports(struct __sk_buff *skb, struct pkt *p)
{
	p->has_ports = 0;
	if (p->non_first || (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return 0;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
		return -1;
	p->sport = bpf_ntohs(ports[0]);
	p->dport = bpf_ntohs(ports[1]);
	p->has_ports = 1;
	return 0;
}

static __always_inline int parse4(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	p->family = 4;
	p->saddr.w[0] = ip.saddr;
	p->daddr.w[0] = ip.daddr;
	p->proto = p->frag_proto = ip.protocol;
	p->ttl = ip.ttl;
	p->tos = ip.tos;
	p->frag_id = ip.id;
	__u32 hlen = (__u32)ip.ihl * 4;
	p->l4_off = ETH_HLEN_ + hlen;
	__u32 tot = bpf_ntohs(ip.tot_len);
	p->payload_len = tot > hlen ? tot - hlen : 0;
	__u16 frag = bpf_ntohs(ip.frag_off);
	p->frag_end = (__u32)(frag & IP_OFFMASK) * 8 + p->payload_len;
	p->non_first = (frag & IP_OFFMASK) != 0;
	p->more_frags = (frag & IP_MF) != 0;
	return load_ports(skb, p);
}

/* The IPv6 Fragment header. */
struct ps_frag6 {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset << 3 | M */
	__be32 id;
};

/* Where an IPv6 extension-header walk ended. */
struct walk6 {
	__u32 off;        /* offset of the header after the chain */
	__u32 frag_end_off; /* offset just past the Fragment header (0: none) */
	__u32 frag_off;   /* fragment offset in bytes */
	__u32 frag_id;
	__u8 nh;          /* the header after the chain: the transport, or what stopped the walk */
	__u8 frag_nh;     /* the Fragment header's next header */
	__u8 non_first;
	__u8 more_frags;
	__u8 for_host;
	__u8 unwalked;
};

/* Walks the extension headers from `off` (next header `nh`), at most PS_MAX_EXT_HEADERS. A
 * non-first fragment ends the walk at its Fragment header: what follows is payload. */
static __always_inline int walk_ext6(struct __sk_buff *skb, __u32 off, __u8 nh, struct walk6 *w)
{
	w->frag_end_off = 0;
	w->frag_off = 0;
	w->frag_id = 0;
	w->frag_nh = 0;
	w->non_first = 0;
	w->more_frags = 0;
	w->for_host = 0;
	w->unwalked = 0;
#pragma unroll
	for (int i = 0; i < PS_MAX_EXT_HEADERS; i++) {
		if (nh == NH_HOPOPTS || nh == NH_ROUTING || nh == NH_DSTOPTS) {
			/* next header, length in 8-byte units beyond the first 8, and for a routing
			 * header its type and segments left */
			__u8 h[4];
			if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
				return -1;
			if (nh == NH_ROUTING && h[3] != 0)
				w->for_host = 1;
			nh = h[0];
			off += ((__u32)h[1] + 1) * 8;
			continue;
		}
		if (nh == NH_FRAGMENT) {
			struct ps_frag6 f;
			if (bpf_skb_load_bytes(skb, off, &f, sizeof(f)) < 0)
				return -1;
			__u16 fo = bpf_ntohs(f.frag_off);
			off += sizeof(f);
			w->frag_end_off = off;
			w->frag_off = fo & IP6_OFFMASK;
			w->frag_id = f.id;
			w->frag_nh = f.nexthdr;
			w->more_frags = (fo & IP6_MF) != 0;
			w->non_first = w->frag_off != 0;
			nh = f.nexthdr;
			if (w->non_first)
				break;
			continue;
		}
		break;
	}
	if (!w->non_first &&
	    (nh == NH_HOPOPTS || nh == NH_ROUTING || nh == NH_DSTOPTS || nh == NH_FRAGMENT))
		w->unwalked = 1;
	w->off = off;
	w->nh = nh;
	return 0;
}

static __always_inline int parse6(struct __sk_buff *skb, struct pkt *p)
{
	struct ipv6hdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 6)
		return -1;
	p->family = 6;
	__builtin_memcpy(p->saddr.b, &ip.saddr, 16);
	__builtin_memcpy(p->daddr.b, &ip.daddr, 16);
	p->ttl = ip.hop_limit;
	__builtin_memcpy(&p->flowinfo, &ip, 4);
	struct walk6 w;
	if (walk_ext6(skb, ETH_HLEN_ + sizeof(ip), ip.nexthdr, &w) < 0)
		return -1;
	p->l4_off = w.off;
	p->proto = w.nh;
	p->for_host = w.for_host;
	p->unwalked = w.unwalked;
	p->non_first = w.non_first;
	p->more_frags = w.more_frags;
	p->frag_id = w.frag_id;
	p->frag_proto = w.frag_nh;
	if (w.frag_end_off) {
		/* The fragmentable part of this packet: what follows the Fragment header. */
		__u32 end = ETH_HLEN_ + sizeof(ip) + bpf_ntohs(ip.payload_len);
		p->payload_len = end > w.frag_end_off ? end - w.frag_end_off : 0;
		p->frag_end = w.frag_off + p->payload_len;
	}
	return load_ports(skb, p);
}

/* Returns 0 for an IPv4 or IPv6 packet it could parse, -1 otherwise. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return parse4(skb, p);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return parse6(skb, p);
	return -1;
}

/* The packet an ICMP error quotes, as far as the programs need it. */
struct inner {
	union ps_addr saddr;
	union ps_addr daddr;
	__u32 l4_off;
	__u8 proto;
	__u8 non_first; /* a non-first fragment names no port */
};

/* Parses the header quoted at `off` by an ICMP error of `family`: 0 when it is a header of that
 * family, -1 otherwise. */
static __always_inline int parse_inner(struct __sk_buff *skb, __u8 family, __u32 off,
				       struct inner *in)
{
	if (family == 4) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return -1;
		if (ip.version != 4 || ip.ihl < 5)
			return -1;
		in->saddr.w[0] = ip.saddr;
		in->daddr.w[0] = ip.daddr;
		in->l4_off = off + (__u32)ip.ihl * 4;
		in->proto = ip.protocol;
		in->non_first = (bpf_ntohs(ip.frag_off) & IP_OFFMASK) != 0;
		return 0;
	}
	struct ipv6hdr ip;
	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 6)
		return -1;
	__builtin_memcpy(in->saddr.b, &ip.saddr, 16);
	__builtin_memcpy(in->daddr.b, &ip.daddr, 16);
	struct walk6 w;
	if (walk_ext6(skb, off + sizeof(ip), ip.nexthdr, &w) < 0 || w.unwalked)
		return -1;
	in->l4_off = w.off;
	in->proto = w.nh;
	in->non_first = w.non_first;
	return 0;
}

#endif
