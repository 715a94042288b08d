// SPDX-License-Identifier: GPL-2.0-only
/* Test fixture: the datapath of the first release (layout 1), kept as it shipped so the upgrade
 * tests run a real layout-1 node. Not built into any binary. */
/*
 * PortSlice datapath: share the node's IPv4 address with slice pods, isolated in port space.
 *
 *   ps_ingress    uplink and lo ingress: node IP:slice port -> straight into the owning pod.
 *   ps_pod_egress host-side veth ingress (what a pod sends): source-port enforcement, hairpin,
 *                 and FIB forwarding out of the uplink that bypasses host netfilter/conntrack.
 *
 * Everything not addressed to/from the node address is left alone (TC_ACT_OK), so the primary
 * CNI's path, ssh and kubelet never notice us. Headers are read with bpf_skb_load_bytes: it copes
 * with non-linear skbs and keeps the verifier happy with variable IP header lengths.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "portslice_abi.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ps_node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PS_PORT_TABLE_SIZE);
	__type(key, __u32);
	__type(value, struct ps_port_owner);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} port_owner SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PS_MAX_PODS);
	__type(key, __u32);
	__type(value, struct ps_pod_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PS_MAX_PODS);
	__type(key, __u32);
	__type(value, struct ps_pod_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pod_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PS_G_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} global_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PS_FRAG_ENTRIES);
	__type(key, struct ps_frag_key);
	__type(value, struct ps_frag_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PS_ECHO_ENTRIES);
	__type(key, struct ps_echo_key);
	__type(value, struct ps_echo_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} echo_ids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PS_MAX_PODS);
	__type(key, struct ps_meta_key);
	__type(value, struct ps_pod_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pod_meta SEC(".maps");

#define ETH_HLEN_ 14
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff
#define ICMP_ECHOREPLY_ 0
#define ICMP_DEST_UNREACH_ 3
#define ICMP_ECHO_ 8
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12

/* What the parser learnt about one IPv4 packet. */
struct pkt {
	struct iphdr ip;
	__u32 l4_off;
	__u16 sport; /* host order; valid when has_ports */
	__u16 dport;
	__u8 has_ports;   /* TCP/UDP first (or only) fragment */
	__u8 non_first;   /* fragment offset != 0: no L4 header */
	__u8 more_frags;  /* MF set on a first fragment */
};

static __always_inline void gstat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&global_stats, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline struct ps_pod_stats *pod_stats_of(__u32 ifindex)
{
	struct ps_pod_stats *s = bpf_map_lookup_elem(&pod_stats, &ifindex);
	if (s)
		return s;
	struct ps_pod_stats zero = {};
	bpf_map_update_elem(&pod_stats, &ifindex, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&pod_stats, &ifindex);
}

static __always_inline void count_rx(__u32 ifindex, __u32 len)
{
	struct ps_pod_stats *s = pod_stats_of(ifindex);
	if (s) {
		__sync_fetch_and_add(&s->rx_packets, 1);
		__sync_fetch_and_add(&s->rx_bytes, len);
	}
}

static __always_inline __u32 node_ip(void)
{
	__u32 zero = 0;
	struct ps_node_config *cfg = bpf_map_lookup_elem(&config, &zero);
	return cfg ? cfg->node_ip : 0;
}

/* Returns 0 for an IPv4 packet it could parse, -1 otherwise. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &p->ip, sizeof(p->ip)) < 0)
		return -1;
	if (p->ip.version != 4 || p->ip.ihl < 5)
		return -1;
	p->l4_off = ETH_HLEN_ + (__u32)p->ip.ihl * 4;
	__u16 frag = bpf_ntohs(p->ip.frag_off);
	p->non_first = (frag & IP_OFFMASK) != 0;
	p->more_frags = (frag & IP_MF) != 0;
	p->has_ports = 0;
	if (!p->non_first && (p->ip.protocol == IPPROTO_TCP || p->ip.protocol == IPPROTO_UDP)) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
			return -1;
		p->sport = bpf_ntohs(ports[0]);
		p->dport = bpf_ntohs(ports[1]);
		p->has_ports = 1;
	}
	return 0;
}

static __always_inline struct ps_port_owner *owner_of(__u8 proto, __u16 port)
{
	__u32 key = (proto == IPPROTO_UDP ? PS_PROTO_UDP : PS_PROTO_TCP) * 65536 + (__u32)port;
	struct ps_port_owner *o = bpf_map_lookup_elem(&port_owner, &key);
	if (!o || !o->host_ifindex)
		return 0;
	return o;
}

/* Peer vs plain redirect is decided by the control plane: a failed redirect_peer is a silent
 * drop, so it is only used for interfaces known to be veths. */
static __always_inline int redirect_into(__u32 ifindex, __u32 flags)
{
	if (flags & PS_F_PEER)
		return bpf_redirect_peer(ifindex, 0);
	return bpf_redirect(ifindex, 0);
}

static __always_inline void frag_key(struct pkt *p, __u8 dir, struct ps_frag_key *k)
{
	k->saddr = p->ip.saddr;
	k->daddr = p->ip.daddr;
	k->ip_id = p->ip.id;
	k->proto = p->ip.protocol;
	k->dir = dir;
}

static __always_inline void frag_record(struct pkt *p, __u8 dir, __u32 ifindex, __u32 flags)
{
	struct ps_frag_key k = {};
	struct ps_frag_val v = {.host_ifindex = ifindex, .flags = flags};
	frag_key(p, dir, &k);
	bpf_map_update_elem(&frags, &k, &v, BPF_ANY);
}

static __always_inline struct ps_frag_val *frag_lookup(struct pkt *p, __u8 dir)
{
	struct ps_frag_key k = {};
	frag_key(p, dir, &k);
	return bpf_map_lookup_elem(&frags, &k);
}

/* ICMP to the node address: echo replies by recorded id, errors by the inner header. */
static __always_inline int ingress_icmp(struct __sk_buff *skb, struct pkt *p, __u32 nip)
{
	__u8 hdr[8];
	if (p->non_first || bpf_skb_load_bytes(skb, p->l4_off, hdr, sizeof(hdr)) < 0)
		return TC_ACT_OK;
	__u8 type = hdr[0];
	if (type == ICMP_ECHOREPLY_) {
		struct ps_echo_key k = {.remote_ip = p->ip.saddr};
		__builtin_memcpy(&k.id, &hdr[4], 2);
		struct ps_echo_val *v = bpf_map_lookup_elem(&echo_ids, &k);
		if (!v)
			return TC_ACT_OK;
		__u32 ifindex = v->host_ifindex, flags = v->flags;
		__u16 orig = v->orig_id;
		/* ICMP has no pseudo header: a plain 16-bit checksum fixup. */
		if (bpf_l4_csum_replace(skb, p->l4_off + 2, k.id, orig, sizeof(__u16)) < 0)
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, p->l4_off + 4, &orig, sizeof(orig), 0) < 0)
			return TC_ACT_SHOT;
		gstat(PS_G_ICMP_STEERED);
		count_rx(ifindex, skb->len);
		return redirect_into(ifindex, flags);
	}
	if (type != ICMP_DEST_UNREACH_ && type != ICMP_TIME_EXCEEDED_ && type != ICMP_PARAMETERPROB_)
		return TC_ACT_OK;
	/* The quoted header is the packet the node address sent: its source port names the pod. */
	struct iphdr inner;
	__u32 inner_off = p->l4_off + 8;
	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0)
		return TC_ACT_OK;
	if (inner.saddr != nip || inner.ihl < 5)
		return TC_ACT_OK;
	__u32 inner_l4 = inner_off + (__u32)inner.ihl * 4;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, inner_l4, ports, sizeof(ports)) < 0)
		return TC_ACT_OK;
	if (inner.protocol == IPPROTO_TCP || inner.protocol == IPPROTO_UDP) {
		struct ps_port_owner *o = owner_of(inner.protocol, bpf_ntohs(ports[0]));
		if (!o)
			return TC_ACT_OK;
		gstat(PS_G_ICMP_STEERED);
		count_rx(o->host_ifindex, skb->len);
		return redirect_into(o->host_ifindex, o->flags);
	}
	if (inner.protocol == IPPROTO_ICMP) {
		/* An error about one of our echo requests (traceroute -I): quoted id is the rewritten one. */
		__u16 qid[2];
		if (bpf_skb_load_bytes(skb, inner_l4 + 4, qid, sizeof(qid)) < 0)
			return TC_ACT_OK;
		struct ps_echo_key k = {.remote_ip = inner.daddr, .id = qid[0]};
		struct ps_echo_val *v = bpf_map_lookup_elem(&echo_ids, &k);
		if (!v)
			return TC_ACT_OK;
		gstat(PS_G_ICMP_STEERED);
		return redirect_into(v->host_ifindex, v->flags);
	}
	return TC_ACT_OK;
}

SEC("classifier")
int ps_ingress(struct __sk_buff *skb)
{
	__u32 nip = node_ip();
	struct pkt p = {};
	if (!nip || parse(skb, &p) < 0 || p.ip.daddr != nip)
		return TC_ACT_OK;

	if (p.non_first) {
		struct ps_frag_val *v = frag_lookup(&p, 0);
		if (!v)
			return TC_ACT_OK;
		gstat(PS_G_FRAG_STEERED);
		count_rx(v->host_ifindex, skb->len);
		return redirect_into(v->host_ifindex, v->flags);
	}
	if (p.ip.protocol == IPPROTO_ICMP)
		return ingress_icmp(skb, &p, nip);
	if (!p.has_ports)
		return TC_ACT_OK;
	struct ps_port_owner *o = owner_of(p.ip.protocol, p.dport);
	if (!o) {
		gstat(PS_G_PASSED);
		return TC_ACT_OK;
	}
	if (p.more_frags)
		frag_record(&p, 0, o->host_ifindex, o->flags);
	gstat(PS_G_STEERED);
	count_rx(o->host_ifindex, skb->len);
	return redirect_into(o->host_ifindex, o->flags);
}

/* Rewrite an echo request's id into the pod's own range so two pods using the same id towards
 * the same remote cannot collide (ids are not confined by any sysctl). */
static __always_inline int egress_echo(struct __sk_buff *skb, struct pkt *p, struct ps_pod_info *pod,
				       __u32 ifindex)
{
	__u16 orig;
	if (bpf_skb_load_bytes(skb, p->l4_off + 4, &orig, sizeof(orig)) < 0)
		return -1;
	__u32 size = (__u32)pod->port_hi - (__u32)pod->port_lo + 1;
	__u16 rewritten = bpf_htons((__u16)(pod->port_lo + (bpf_ntohs(orig) % size)));
	struct ps_echo_key k = {.remote_ip = p->ip.daddr, .id = rewritten};
	struct ps_echo_val v = {.host_ifindex = ifindex, .flags = pod->flags, .orig_id = orig};
	if (bpf_map_update_elem(&echo_ids, &k, &v, BPF_ANY) < 0)
		return -1;
	if (rewritten == orig)
		return 0;
	if (bpf_l4_csum_replace(skb, p->l4_off + 2, orig, rewritten, sizeof(__u16)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + 4, &rewritten, sizeof(rewritten), 0) < 0 ? -1 : 0;
}

/* Is this node-address packet one the pod may send? Counts what it refuses. */
static __always_inline int egress_allowed(struct __sk_buff *skb, struct pkt *p,
					  struct ps_pod_info *pod, __u32 ifindex)
{
	struct ps_pod_stats *s = pod_stats_of(ifindex);
	__u8 proto = p->ip.protocol;
	if (p->non_first) {
		struct ps_frag_val *v = frag_lookup(p, 1);
		if (v && v->host_ifindex == ifindex)
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
				frag_record(p, 1, ifindex, 0);
			return 1;
		}
		if (s)
			__sync_fetch_and_add(&s->drop_src_port, 1);
		return 0;
	}
	if (proto == IPPROTO_ICMP) {
		__u8 type;
		if (bpf_skb_load_bytes(skb, p->l4_off, &type, 1) < 0)
			return 0;
		if (type == ICMP_ECHO_)
			return egress_echo(skb, p, pod, ifindex) == 0;
		/* Errors the pod's kernel sends about its own flows (port unreachable...). */
		if (type == ICMP_DEST_UNREACH_ || type == ICMP_TIME_EXCEEDED_ || type == ICMP_PARAMETERPROB_)
			return 1;
	}
	if (s)
		__sync_fetch_and_add(&s->drop_other, 1);
	return 0;
}

/* Forward straight out of the uplink: the host's netfilter and conntrack never see the flow, so
 * there is no per-flow state and no half-seen connection for kube-proxy's INVALID rule. */
static __always_inline int forward(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	fib.family = 2; /* AF_INET */
	fib.tos = p->ip.tos;
	fib.l4_protocol = p->ip.protocol;
	/* tot_len = 0: a GSO super-packet's length would otherwise read as "fragmentation needed". */
	fib.tot_len = 0;
	fib.ipv4_src = p->ip.saddr;
	fib.ipv4_dst = p->ip.daddr;
	fib.ifindex = skb->ingress_ifindex;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK; /* let the host stack deal with it (and send any ICMP error) */
	if (p->ip.ttl <= 1)
		return TC_ACT_OK; /* host stack sends time exceeded */
	/* Decrement TTL as a router would, fixing the IP checksum incrementally. */
	__u16 old = *(__u16 *)&p->ip.ttl;
	__u8 ttl = p->ip.ttl - 1;
	__u32 ttl_off = ETH_HLEN_ + __builtin_offsetof(struct iphdr, ttl);
	__u8 buf[2] = {ttl, p->ip.protocol};
	__u16 new;
	__builtin_memcpy(&new, buf, 2);
	if (bpf_l3_csum_replace(skb, ETH_HLEN_ + __builtin_offsetof(struct iphdr, check), old, new,
				sizeof(__u16)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, ttl_off, &ttl, 1, 0) < 0)
		return TC_ACT_SHOT;
	gstat(PS_G_FORWARDED);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0);
}

SEC("classifier")
int ps_pod_egress(struct __sk_buff *skb)
{
	__u32 nip = node_ip();
	struct pkt p = {};
	if (!nip || parse(skb, &p) < 0)
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;

	if (p.ip.saddr != nip) {
		/* The primary CNI's path. Only steer node IP:slice port (matrix row 4). */
		if (p.ip.daddr == nip && p.has_ports) {
			struct ps_port_owner *o = owner_of(p.ip.protocol, p.dport);
			if (o && o->host_ifindex != ifindex) {
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
	if (!egress_allowed(skb, &p, pod, ifindex))
		return TC_ACT_SHOT;
	struct ps_pod_stats *s = pod_stats_of(ifindex);
	if (s) {
		__sync_fetch_and_add(&s->tx_packets, 1);
		__sync_fetch_and_add(&s->tx_bytes, skb->len);
	}

	if (p.ip.daddr == nip) {
		/* Hairpin to another slice, or the host's own port (host stack, accept_local). */
		if (p.has_ports) {
			struct ps_port_owner *o = owner_of(p.ip.protocol, p.dport);
			if (o && o->host_ifindex != ifindex) {
				if (p.more_frags)
					frag_record(&p, 0, o->host_ifindex, o->flags);
				gstat(PS_G_STEERED);
				count_rx(o->host_ifindex, skb->len);
				return redirect_into(o->host_ifindex, o->flags);
			}
		} else if (p.non_first) {
			struct ps_frag_val *v = frag_lookup(&p, 0);
			if (v)
				return redirect_into(v->host_ifindex, v->flags);
		}
		gstat(PS_G_PASSED);
		return TC_ACT_OK;
	}
	return forward(skb, &p);
}
