/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The maps of the datapath (layouts in portslice_abi.h), the counters every program bumps, and the
 * port table lookup and redirect every steering decision ends in.
 * Included once, by portslice.bpf.c.
 */
#ifndef PORTSLICE_MAPS_H
#define PORTSLICE_MAPS_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "portslice_abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ps_node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_config SEC(".maps");

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
} frag_verdicts SEC(".maps");

/* One slot per echo id: a pod's ids are rewritten into its own range, so it writes only its own
 * slots and nothing is shared or evicted. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PS_ECHO_SLOTS);
	__type(key, __u32);
	__type(value, struct ps_echo_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} echo_slots SEC(".maps");

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

/* The owner of `port` of `proto` (TCP or UDP): one slot per port, for every node address. */
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

#endif
