// SPDX-License-Identifier: GPL-2.0-only
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

/* No LRU: an LRU shared by every pod lets one pod's (or one remote's) flood evict the others'
 * entries. Entries are bounded per owning pod instead (PS_FRAG_QUOTA) and leave on completion or
 * by their own timer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PS_FRAG_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ps_frag_key);
	__type(value, struct ps_frag_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} frags SEC(".maps");

/* One slot per echo id: a pod's ids are rewritten into its own range, so it writes only its own
 * slots and nothing is shared or evicted. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PS_ECHO_SLOTS);
	__type(key, __u32);
	__type(value, struct ps_echo_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} echo_ids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PS_SRC_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct ps_src_key);
	__type(value, struct ps_src_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} src_allow SEC(".maps");

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
#define ICMP_FRAG_NEEDED_ 4 /* code of ICMP_DEST_UNREACH_ */
#define ICMP_ECHO_ 8
#define ICMP_TIME_EXCEEDED_ 11
#define ICMP_PARAMETERPROB_ 12
#define CLOCK_MONOTONIC_ 1
#define LOOPBACK_IFINDEX_ 1 /* lo is ifindex 1 in every network namespace */

/* What the parser learnt about one IPv4 packet. */
struct pkt {
	struct iphdr ip;
	__u32 l4_off;
	__u32 payload_len; /* IP payload bytes of this packet (fragment) */
	__u32 frag_end;    /* offset of this fragment's end within the datagram's payload */
	__u16 sport;       /* host order; valid when has_ports */
	__u16 dport;
	__u8 has_ports;  /* TCP/UDP first (or only) fragment */
	__u8 non_first;  /* fragment offset != 0: no L4 header */
	__u8 more_frags; /* MF set */
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
	__u32 hlen = (__u32)p->ip.ihl * 4;
	p->l4_off = ETH_HLEN_ + hlen;
	__u32 tot = bpf_ntohs(p->ip.tot_len);
	p->payload_len = tot > hlen ? tot - hlen : 0;
	__u16 frag = bpf_ntohs(p->ip.frag_off);
	p->frag_end = (__u32)(frag & IP_OFFMASK) * 8 + p->payload_len;
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

/* --- Allowed sources ------------------------------------------------------------------------ */

/* Is `saddr` in the allowed-source list of the pod with host ifindex `pod`? One LPM lookup,
 * only for pods whose port slots carry PS_F_SRC_FILTER. */
static __always_inline int source_allowed(__u32 pod, __u32 saddr)
{
	struct ps_src_key k = {.prefixlen = 64 + 32, .pod = pod, .family = PS_SRC_FAMILY_V4};
	__builtin_memcpy(k.addr, &saddr, 4);
	return bpf_map_lookup_elem(&src_allow, &k) != 0;
}

/* A packet for `o`'s ports that its allowed-source list refuses. Counted per pod and node-wide. */
static __always_inline int source_refused(struct ps_port_owner *o, __u32 saddr)
{
	if (!(o->flags & PS_F_SRC_FILTER) || source_allowed(o->host_ifindex, saddr))
		return 0;
	gstat(PS_G_DROP_SOURCE);
	struct ps_pod_stats *s = pod_stats_of(o->host_ifindex);
	if (s)
		__sync_fetch_and_add(&s->drop_source, 1);
	return 1;
}

/* --- Fragments ------------------------------------------------------------------------------ */
/*
 * Non-first fragments carry no ports: the first fragment's verdict is recorded in "frags" and
 * followed by the rest. Every entry belongs to one pod (the destination pod, or the sending pod
 * for its own datagrams) and counts against that pod's quota (ps_pod_stats.frag_live, at most
 * PS_FRAG_QUOTA). Entries are never evicted: an entry leaves when its datagram is complete (the
 * fragments' payload adds up to the datagram's length) or when its timer fires. So a flood of
 * first fragments, from a pod or from a remote, fills at most the quota of the pod it is aimed at
 * and never touches another pod's entries.
 */

static __always_inline void frag_release(__u32 owner)
{
	struct ps_pod_stats *s = bpf_map_lookup_elem(&pod_stats, &owner);
	if (s)
		__sync_fetch_and_add(&s->frag_live, -1);
}

/* Timer callback: an incomplete datagram's entry expires (a fragment was lost). */
static int frag_expired(void *map, struct ps_frag_key *key, struct ps_frag_val *val)
{
	__u32 owner = val->host_ifindex;
	if (bpf_map_delete_elem(map, key) == 0)
		frag_release(owner);
	return 0;
}

/* dir PS_FRAG_TO_POD: src = the sender's address. PS_FRAG_FROM_POD, PS_FRAG_HAIRPIN: src = the
 * sending pod's host ifindex, so two pods' datagrams with the same IP id never share a key. */
static __always_inline void frag_key(struct pkt *p, __u8 dir, __u32 src, struct ps_frag_key *k)
{
	k->src = src;
	k->daddr = p->ip.daddr;
	k->ip_id = p->ip.id;
	k->proto = p->ip.protocol;
	k->dir = dir;
}

static __always_inline void frag_record(struct pkt *p, __u8 dir, __u32 src, __u32 owner,
					__u32 flags)
{
	struct ps_frag_key k = {};
	frag_key(p, dir, src, &k);
	struct ps_frag_val *v = bpf_map_lookup_elem(&frags, &k);
	if (v) {
		/* A live entry of another pod stays: first come, nothing is evicted. */
		if (v->host_ifindex != owner) {
			gstat(PS_G_FRAG_UNTRACKED);
			return;
		}
		/* The sender reused the IP id within the timeout: a new datagram of the same owner. */
		v->flags = flags;
		v->seen = p->payload_len;
		v->total = 0;
		bpf_timer_start(&v->timer, PS_FRAG_TIMEOUT_NS, 0);
		return;
	}
	struct ps_pod_stats *s = pod_stats_of(owner);
	if (!s) {
		gstat(PS_G_FRAG_UNTRACKED);
		return;
	}
	/* Take a share first, give it back when over quota: the bound holds under concurrency. */
	if (__sync_fetch_and_add(&s->frag_live, 1) >= PS_FRAG_QUOTA) {
		__sync_fetch_and_add(&s->frag_live, -1);
		gstat(PS_G_FRAG_UNTRACKED);
		return;
	}
	struct ps_frag_val nv = {.host_ifindex = owner, .flags = flags, .seen = p->payload_len};
	if (bpf_map_update_elem(&frags, &k, &nv, BPF_NOEXIST) < 0) {
		__sync_fetch_and_add(&s->frag_live, -1);
		gstat(PS_G_FRAG_UNTRACKED);
		return;
	}
	v = bpf_map_lookup_elem(&frags, &k);
	if (!v)
		return; /* already completed and removed by a racing fragment, which released it */
	if (bpf_timer_init(&v->timer, &frags, CLOCK_MONOTONIC_) < 0 ||
	    bpf_timer_set_callback(&v->timer, frag_expired) < 0 ||
	    bpf_timer_start(&v->timer, PS_FRAG_TIMEOUT_NS, 0) < 0) {
		/* An entry that cannot expire would hold its share for good. */
		if (bpf_map_delete_elem(&frags, &k) == 0)
			__sync_fetch_and_add(&s->frag_live, -1);
	}
}

/* A non-first fragment: the owner its first fragment recorded, if any (0 when found). Adds the
 * fragment's bytes and removes the entry once the datagram is complete, so a complete datagram
 * holds no share of the quota. Whichever fragment completes the sum (after the last fragment set
 * the total) removes it; reordered fragments are fine. */
static __always_inline int frag_follow(struct pkt *p, __u8 dir, __u32 src, __u32 *owner,
				       __u32 *flags)
{
	struct ps_frag_key k = {};
	frag_key(p, dir, src, &k);
	struct ps_frag_val *v = bpf_map_lookup_elem(&frags, &k);
	if (!v)
		return -1;
	*owner = v->host_ifindex;
	*flags = v->flags;
	if (!p->more_frags)
		v->total = p->frag_end;
	__u32 seen = __sync_fetch_and_add(&v->seen, p->payload_len) + p->payload_len;
	__u32 total = *(volatile __u32 *)&v->total;
	if (total && seen >= total && bpf_map_delete_elem(&frags, &k) == 0)
		frag_release(*owner);
	return 0;
}

/* --- Echo ids ------------------------------------------------------------------------------- */

/* The slot of a (rewritten) echo id, if a pod sent a request with it to `remote` lately. The
 * remote is part of the match so that the host's own pings, whose ids may fall in a slice's
 * range, keep their replies from every other remote. */
static __always_inline struct ps_echo_slot *echo_slot(__u16 id_net, __u32 remote)
{
	__u32 slot = bpf_ntohs(id_net);
	struct ps_echo_slot *e = bpf_map_lookup_elem(&echo_ids, &slot);
	if (!e || !e->host_ifindex || e->remote != remote)
		return 0;
	__u32 now = (__u32)(bpf_ktime_get_ns() >> 30);
	if (now - e->stamp > PS_ECHO_TTL_UNITS)
		return 0;
	return e;
}

/* --- ps_ingress ----------------------------------------------------------------------------- */

/* ICMP to the node address: echo replies by their id's slot, errors by the inner header. */
static __always_inline int ingress_icmp(struct __sk_buff *skb, struct pkt *p, __u32 nip)
{
	__u8 hdr[8];
	if (p->non_first || bpf_skb_load_bytes(skb, p->l4_off, hdr, sizeof(hdr)) < 0)
		return TC_ACT_OK;
	__u8 type = hdr[0];
	if (type == ICMP_ECHOREPLY_) {
		__u16 id;
		__builtin_memcpy(&id, &hdr[4], 2);
		struct ps_echo_slot *e = echo_slot(id, p->ip.saddr);
		if (!e)
			return TC_ACT_OK;
		__u32 ifindex = e->host_ifindex, flags = e->flags;
		__u16 orig = e->orig_id;
		/* ICMP has no pseudo header: a plain 16-bit checksum fixup. */
		if (bpf_l4_csum_replace(skb, p->l4_off + 2, id, orig, sizeof(__u16)) < 0)
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, p->l4_off + 4, &orig, sizeof(orig), 0) < 0)
			return TC_ACT_SHOT;
		gstat(PS_G_ICMP_STEERED);
		count_rx(ifindex, skb->len);
		return redirect_into(ifindex, flags);
	}
	if (type != ICMP_DEST_UNREACH_ && type != ICMP_TIME_EXCEEDED_ && type != ICMP_PARAMETERPROB_)
		return TC_ACT_OK;
	/* The quoted header is the packet the node address sent: its source port names the pod.
	 * Errors are not source-filtered: routers on the path must reach the pod (PMTU). */
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
		struct ps_echo_slot *e = echo_slot(qid[0], inner.daddr);
		if (!e)
			return TC_ACT_OK;
		gstat(PS_G_ICMP_STEERED);
		return redirect_into(e->host_ifindex, e->flags);
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
		__u32 owner, flags;
		if (frag_follow(&p, PS_FRAG_TO_POD, p.ip.saddr, &owner, &flags) < 0)
			return TC_ACT_OK;
		gstat(PS_G_FRAG_STEERED);
		count_rx(owner, skb->len);
		return redirect_into(owner, flags);
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
	/* lo carries only the node's own packets (from the node address every slice pod shares):
	 * the list filters what comes from outside. */
	if (skb->ifindex != LOOPBACK_IFINDEX_ && source_refused(o, p.ip.saddr))
		return TC_ACT_SHOT;
	if (p.more_frags)
		frag_record(&p, PS_FRAG_TO_POD, p.ip.saddr, o->host_ifindex, o->flags);
	gstat(PS_G_STEERED);
	count_rx(o->host_ifindex, skb->len);
	return redirect_into(o->host_ifindex, o->flags);
}

/* --- ps_pod_egress -------------------------------------------------------------------------- */

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
	__u32 slot = (__u32)pod->port_lo + (__u32)bpf_ntohs(orig) % size;
	struct ps_echo_slot *e = bpf_map_lookup_elem(&echo_ids, &slot);
	if (!e)
		return -1;
	e->host_ifindex = ifindex;
	e->flags = pod->flags;
	e->orig_id = orig;
	e->remote = p->ip.daddr;
	e->stamp = (__u32)(bpf_ktime_get_ns() >> 30);
	__u16 rewritten = bpf_htons((__u16)slot);
	if (rewritten == orig)
		return 0;
	if (bpf_l4_csum_replace(skb, p->l4_off + 2, orig, rewritten, sizeof(__u16)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + 4, &rewritten, sizeof(rewritten), 0) < 0 ? -1 : 0;
}

/* May the pod send this ICMP error? Only about a packet it received: the quoted header must be a
 * first (or only) fragment to the node address, on the pod's own ports and protocols (for ICMP,
 * an echo with an id of its range), sent by the host the error goes back to. Anything else would
 * let a pod forge errors about the host's or other pods' flows (e.g. port unreachable tearing
 * down their connections).
 * Never frag-needed, not even about its own flow: the remote caches a path MTU per destination
 * address, and the node address is everyone's, so one pod would lower it for every slice and the
 * host. A pod is an endpoint; only routers on the path send frag-needed. */
static __always_inline int icmp_error_is_own(struct __sk_buff *skb, struct pkt *p,
					     struct ps_pod_info *pod, __u32 nip)
{
	__u8 type_code[2];
	if (bpf_skb_load_bytes(skb, p->l4_off, type_code, sizeof(type_code)) < 0)
		return 0;
	if (type_code[0] == ICMP_DEST_UNREACH_ && type_code[1] == ICMP_FRAG_NEEDED_)
		return 0;
	struct iphdr inner;
	__u32 inner_off = p->l4_off + 8;
	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0)
		return 0;
	if (inner.version != 4 || inner.ihl < 5)
		return 0;
	if (inner.daddr != nip || inner.saddr != p->ip.daddr)
		return 0;
	if (bpf_ntohs(inner.frag_off) & IP_OFFMASK)
		return 0; /* a non-first fragment names no port */
	__u32 inner_l4 = inner_off + (__u32)inner.ihl * 4;
	if (inner.protocol == IPPROTO_TCP || inner.protocol == IPPROTO_UDP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, inner_l4, ports, sizeof(ports)) < 0)
			return 0;
		__u8 bit = inner.protocol == IPPROTO_TCP ? PS_P_TCP : PS_P_UDP;
		__u16 dport = bpf_ntohs(ports[1]);
		return (pod->protocols & bit) && dport >= pod->port_lo && dport <= pod->port_hi;
	}
	if (inner.protocol == IPPROTO_ICMP) {
		__u8 h[6];
		if (bpf_skb_load_bytes(skb, inner_l4, h, sizeof(h)) < 0)
			return 0;
		if (h[0] != ICMP_ECHO_ && h[0] != ICMP_ECHOREPLY_)
			return 0;
		__u16 id = ((__u16)h[4] << 8) | h[5];
		return id >= pod->port_lo && id <= pod->port_hi;
	}
	return 0;
}

/* Is this node-address packet one the pod may send? Counts what it refuses. */
static __always_inline int egress_allowed(struct __sk_buff *skb, struct pkt *p,
					  struct ps_pod_info *pod, __u32 ifindex, __u32 nip)
{
	struct ps_pod_stats *s = pod_stats_of(ifindex);
	__u8 proto = p->ip.protocol;
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
	if (proto == IPPROTO_ICMP) {
		__u8 type;
		if (bpf_skb_load_bytes(skb, p->l4_off, &type, 1) < 0)
			return 0;
		if (type == ICMP_ECHO_)
			return egress_echo(skb, p, pod, ifindex) == 0;
		if (type == ICMP_DEST_UNREACH_ || type == ICMP_TIME_EXCEEDED_ || type == ICMP_PARAMETERPROB_) {
			if (icmp_error_is_own(skb, p, pod, nip))
				return 1;
			gstat(PS_G_DROP_ICMP);
			if (s)
				__sync_fetch_and_add(&s->drop_icmp_error, 1);
			return 0;
		}
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
		/* The primary CNI's path. Only steer node IP:slice port (matrix row 4); the pod's
		 * private address is a real source, so the slice's allowed-source list applies. */
		if (p.ip.daddr == nip && p.has_ports) {
			struct ps_port_owner *o = owner_of(p.ip.protocol, p.dport);
			if (o && o->host_ifindex != ifindex) {
				if (source_refused(o, p.ip.saddr))
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
	if (!egress_allowed(skb, &p, pod, ifindex, nip))
		return TC_ACT_SHOT;
	struct ps_pod_stats *s = pod_stats_of(ifindex);
	if (s) {
		__sync_fetch_and_add(&s->tx_packets, 1);
		__sync_fetch_and_add(&s->tx_bytes, skb->len);
	}

	if (p.ip.daddr == nip) {
		/* Hairpin to another slice, or the host's own port (host stack, accept_local). From
		 * the node address, like the host's own packets: not source-filtered (see ps_ingress). */
		if (p.has_ports) {
			struct ps_port_owner *o = owner_of(p.ip.protocol, p.dport);
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
