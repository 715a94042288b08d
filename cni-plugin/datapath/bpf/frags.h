/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Fragment tracking, for IPv4 and IPv6 alike (an IPv6 datagram is named by its Fragment header's
 * id and next header). Included once, by portslice.bpf.c.
 */
#ifndef PORTSLICE_FRAGS_H
#define PORTSLICE_FRAGS_H

#include "maps.h"
#include "parse.h"

#define CLOCK_MONOTONIC_ 1

/*
 * Non-first fragments carry no ports: the first fragment's verdict is recorded in "frag_verdicts" and
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
static __always_inline void frag_key(struct pkt *p, __u8 dir, __u32 src_ifindex,
				     struct ps_frag_key *k)
{
	if (dir == PS_FRAG_TO_POD)
		__builtin_memcpy(k->src, p->saddr.b, 16);
	else
		__builtin_memcpy(k->src, &src_ifindex, 4);
	__builtin_memcpy(k->daddr, p->daddr.b, 16);
	k->id = p->frag_id;
	k->proto = p->frag_proto;
	k->dir = dir;
	k->family = p->family;
}

/* Records `owner` for the datagram whose first fragment `p` is. `src_ifindex`: the sending pod
 * (ignored for PS_FRAG_TO_POD, where the sender's address names it). */
static __always_inline void frag_record(struct pkt *p, __u8 dir, __u32 src_ifindex, __u32 owner,
					__u32 flags)
{
	struct ps_frag_key k = {};
	frag_key(p, dir, src_ifindex, &k);
	struct ps_frag_val *v = bpf_map_lookup_elem(&frag_verdicts, &k);
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
	if (bpf_map_update_elem(&frag_verdicts, &k, &nv, BPF_NOEXIST) < 0) {
		__sync_fetch_and_add(&s->frag_live, -1);
		gstat(PS_G_FRAG_UNTRACKED);
		return;
	}
	v = bpf_map_lookup_elem(&frag_verdicts, &k);
	if (!v)
		return; /* already completed and removed by a racing fragment, which released it */
	if (bpf_timer_init(&v->timer, &frag_verdicts, CLOCK_MONOTONIC_) < 0 ||
	    bpf_timer_set_callback(&v->timer, frag_expired) < 0 ||
	    bpf_timer_start(&v->timer, PS_FRAG_TIMEOUT_NS, 0) < 0) {
		/* An entry that cannot expire would hold its share for good. */
		if (bpf_map_delete_elem(&frag_verdicts, &k) == 0)
			__sync_fetch_and_add(&s->frag_live, -1);
	}
}

/* A non-first fragment: the owner its first fragment recorded, if any (0 when found). Adds the
 * fragment's bytes and removes the entry once the datagram is complete, so a complete datagram
 * holds no share of the quota. Whichever fragment completes the sum (after the last fragment set
 * the total) removes it; reordered fragments are fine. */
static __always_inline int frag_follow(struct pkt *p, __u8 dir, __u32 src_ifindex, __u32 *owner,
				       __u32 *flags)
{
	struct ps_frag_key k = {};
	frag_key(p, dir, src_ifindex, &k);
	struct ps_frag_val *v = bpf_map_lookup_elem(&frag_verdicts, &k);
	if (!v)
		return -1;
	*owner = v->host_ifindex;
	*flags = v->flags;
	if (!p->more_frags)
		v->total = p->frag_end;
	__u32 seen = __sync_fetch_and_add(&v->seen, p->payload_len) + p->payload_len;
	__u32 total = *(volatile __u32 *)&v->total;
	if (total && seen >= total && bpf_map_delete_elem(&frag_verdicts, &k) == 0)
		frag_release(*owner);
	return 0;
}

#endif
