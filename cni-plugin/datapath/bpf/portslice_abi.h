/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The one definition of every map key/value PortSlice's eBPF programs share with user space.
 * Mirrored field for field by src/abi.rs; a test there checks sizes and offsets agree.
 * All structs are naturally aligned with explicit padding so C and Rust lay them out the same.
 * Addresses are in network byte order; ports and ICMP ids in the port table are host order. Where
 * a field holds an address of either family it is 16 bytes, an IPv4 address in the first 4 (the
 * rest zero), as in "src_allow".
 *
 * PS_ABI_VERSION names this layout. Maps and programs are pinned under <pin root>/v<version>/, so
 * a daemon meeting pins of another layout knows it (and migrates layout 1, which was pinned
 * directly under <pin root>/maps and /progs; see src/migrate.rs). Any change to a map that holds
 * the pods' attachments (pods, pod_meta, port_owner, pod_stats, src_allow: their struct, type or
 * size, or the meaning of a field or flag) bumps the version. A map the daemon rewrites at start
 * or whose entries live seconds (the node config, fragment verdicts, echo slots) may instead
 * change under a new name: the build stays in its layout, an upgrade is a restart, and the old
 * name's pin is removed once the links run the new programs (src/abi.rs, map::RETIRED). So the
 * dual-stack build renamed config, frags and echo_ids of the release before it.
 */
#ifndef PORTSLICE_ABI_H
#define PORTSLICE_ABI_H

#include <linux/types.h>
#include <linux/bpf.h> /* struct bpf_timer */

#define PS_ABI_VERSION 2

/* Port table: one slot per (protocol, port). key = proto * 65536 + port. */
#define PS_PROTO_TCP 0
#define PS_PROTO_UDP 1
#define PS_PORT_TABLE_SIZE (2 * 65536)

#define PS_MAX_PODS 4096
#define PS_CONTAINER_ID_LEN 128
#define PS_SLICE_KEY_LEN 256

/*
 * Fragment state is bounded per pod, never shared (see "frag_verdicts" below): at most PS_FRAG_QUOTA
 * datagrams in flight per owning pod. The map holds twice the quota of every pod it can hold: a
 * (re)attach zeroes a pod's count while its old entries may still live (at most one quota more),
 * so the map cannot fill while every pod stays within its share, and nothing is ever evicted.
 * (No preallocation: memory follows the entries in use; the kernel allocates only the buckets.)
 */
#define PS_FRAG_QUOTA 64
#define PS_FRAG_ENTRIES (2 * PS_FRAG_QUOTA * PS_MAX_PODS)
/* An incomplete datagram's entry expires after this (lost fragments never complete it). */
#define PS_FRAG_TIMEOUT_NS (2ULL * 1000 * 1000 * 1000)

/* Echo ids: one slot per family and possible id, key = family * 65536 + id (PS_ECHO_V4: ICMP,
 * PS_ECHO_V6: ICMPv6). A slice pod's ids are rewritten into its own range, so a pod writes only
 * slots of its own range, and its pings of one family never take the other's replies. */
#define PS_ECHO_V4 0
#define PS_ECHO_V6 1
#define PS_ECHO_SLOTS (2 * 65536)
/* An echo slot steers replies for this long after the pod's last request, in units of 2^30 ns
 * (about 1.07 s): long enough for any reply, short enough that a stale slot does not keep taking
 * the host's own replies with that id. */
#define PS_ECHO_TTL_UNITS 30

/* Allowed sources: at most this many CIDRs per slice pod (enforced by user space). The trie holds
 * twice that for every pod: a list is replaced by writing the new entries before removing the
 * old, so one pod holds at most two lists at once, and no pod's list can crowd out another's. */
#define PS_MAX_SOURCES_PER_POD 128
#define PS_SRC_ENTRIES (2 * PS_MAX_SOURCES_PER_POD * PS_MAX_PODS)

/* ps_port_owner.flags / ps_pod_info.flags */
#define PS_F_PEER 0x1  /* host ifindex is a veth: bpf_redirect_peer into its peer */
#define PS_F_SLICE 0x2 /* the pod holds a slice (else: steering only, matrix row 4) */
/* port_owner only: the owner has a non-empty allowed-source list in "src_allow". A flag in the
 * slot the hot path reads anyway, so pods without a list pay nothing for the feature. */
#define PS_F_SRC_FILTER 0x4

/* ps_pod_info.protocols bits */
#define PS_P_TCP 0x1
#define PS_P_UDP 0x2

/* Indexes of the global_stats array. */
#define PS_G_NOT_IPV4 0        /* unused, kept so indexes never move */
#define PS_G_STEERED 1         /* packets redirected into a pod by an ingress program */
#define PS_G_PASSED 2          /* packets to the node address left to the host stack */
#define PS_G_FORWARDED 3       /* pod egress sent out through bpf_fib_lookup + redirect */
#define PS_G_DROP_SPOOF 4      /* node-address packets from a pod with no slice */
#define PS_G_DROP_FRAG 5       /* non-first fragments from a pod with no recorded first fragment */
#define PS_G_ICMP_STEERED 6    /* ICMP replies/errors steered into a pod */
#define PS_G_FRAG_STEERED 7    /* non-first fragments steered into a pod */
#define PS_G_DROP_ICMP 8       /* ICMP errors from a slice pod about a flow not its own */
#define PS_G_DROP_SOURCE 9     /* packets to a slice's ports from a source outside its list */
#define PS_G_FRAG_UNTRACKED 10 /* first fragments not recorded: owner's quota full, or a clash */
#define PS_G_V6_CHAIN_LONG 11  /* IPv6 to/from a node address with more extension headers than
				* the programs walk (PS_MAX_EXT_HEADERS): to the host, or dropped */
#define PS_G_MAX 16            /* room for new counters without changing the map's shape */

/* IPv6 extension headers (hop-by-hop, routing, destination options, fragment) walked before the
 * transport header. Real traffic carries one or two; a longer chain is not steered. */
#define PS_MAX_EXT_HEADERS 6

/* Map "node_config", ARRAY[1]. Written once by the daemon. A family whose address is zero passes
 * untouched: the node shares no address of that family. */
struct ps_node_config {
	__u32 node_ip;        /* IPv4, network order; 0 = no IPv4 node address */
	__u32 uplink_ifindex; /* informational */
	__u8 node_ip6[16];    /* IPv6; all zero = no IPv6 node address */
};

/* Map "port_owner", ARRAY[PS_PORT_TABLE_SIZE]. host_ifindex 0 = port not in any slice. */
struct ps_port_owner {
	__u32 host_ifindex;
	__u32 flags; /* PS_F_* */
};

/* Map "pods", HASH keyed by __u32 host veth ifindex. */
struct ps_pod_info {
	__u32 flags;   /* PS_F_PEER, PS_F_SLICE */
	__u32 pod_ip;  /* private IPv4 address from the primary CNI, network order; 0 for an IPv6-only
			* pod (informational: the programs never read it) */
	__u16 port_lo; /* slice range, host order, inclusive */
	__u16 port_hi;
	__u8 protocols; /* PS_P_* */
	__u8 _pad[3];
};

/* Map "pod_stats", HASH keyed by __u32 host veth ifindex. Updated atomically. */
struct ps_pod_stats {
	__u64 rx_packets; /* steered into the pod */
	__u64 rx_bytes;
	__u64 tx_packets; /* node-address packets the pod sent that were allowed */
	__u64 tx_bytes;
	__u64 drop_src_port;   /* node-address packets with a source port outside the slice */
	__u64 drop_other;      /* other node-address packets refused (protocol, fragments) */
	__u64 drop_icmp_error; /* ICMP errors the pod sent about flows not its own */
	__u64 drop_source;     /* packets to the pod's ports from a source outside its list */
	__s64 frag_live;       /* fragment entries the pod owns now: the quota's count, a gauge */
};

/* Map "frag_verdicts", HASH[PS_FRAG_ENTRIES] (no LRU: nothing is evicted, see PS_FRAG_QUOTA): the first
 * fragment's verdict, for the fragments that carry no ports. Entries leave when their datagram is
 * complete (seen == total) or when their timer fires. Each entry belongs to one pod and counts
 * against that pod's quota: the destination pod for dir 0 and 2, the sending pod for dir 1. IPv4
 * and IPv6 datagrams share the map and the quota. */
#define PS_FRAG_TO_POD 0  /* from the uplink or lo; src = the remote (or node) address */
#define PS_FRAG_FROM_POD 1 /* a pod's own datagram; src = the sending pod's host ifindex */
#define PS_FRAG_HAIRPIN 2 /* pod to pod on the node address; src = the sending pod's ifindex */
struct ps_frag_key {
	__u8 src[16];   /* the sender's address, or a host ifindex (host order, first 4 bytes): see dir */
	__u8 daddr[16];
	__u32 id;       /* IPv4: the IP id (16 bits); IPv6: the Fragment header's id; network order */
	__u8 proto;     /* IPv4: the protocol; IPv6: the Fragment header's next header */
	__u8 dir;       /* PS_FRAG_* */
	__u8 family;    /* 4 or 6 */
	__u8 _pad;
};
struct ps_frag_val {
	__u32 host_ifindex; /* the owner */
	__u32 flags;
	__u32 seen;  /* payload bytes of the datagram steered so far */
	__u32 total; /* payload length of the datagram, known once its last fragment was seen */
	struct bpf_timer timer;
};

/* Map "echo_slots", ARRAY[PS_ECHO_SLOTS] keyed by family * 65536 + the rewritten echo id (host
 * order). */
struct ps_echo_slot {
	__u32 host_ifindex; /* 0 = never used */
	__u32 flags;
	__u16 orig_id; /* the id the pod chose, network order */
	__u16 _pad;
	__u32 stamp; /* bpf_ktime_get_ns() >> 30 of the pod's last request */
	__u8 remote[16]; /* the request's destination: only its replies (and errors about it) steer */
};

/* Map "src_allow", LPM_TRIE[PS_SRC_ENTRIES]: the allowed sources of slice pods. A pod's CIDR
 * addr/n is {prefixlen = 64 + n, pod, family, addr}: the pod id and the family are always matched
 * whole, so one trie serves every pod and both address families, and an IPv6 entry (even ::/0)
 * can never match an IPv4 source. */
#define PS_SRC_FAMILY_V4 4
#define PS_SRC_FAMILY_V6 6
#define PS_SRC_KEY_BITS (8 * (4 + 4 + 16))
struct ps_src_key {
	__u32 prefixlen;
	__u32 pod;    /* host veth ifindex, host order */
	__u32 family; /* PS_SRC_FAMILY_*, host order */
	__u8 addr[16]; /* IPv4 in the first 4 bytes (network order), or IPv6 */
};
struct ps_src_val {
	__u32 allow; /* 1 */
};

/* Map "pod_meta", HASH keyed by container id: control-plane bookkeeping only, never read by the
 * programs. It lives in a pinned map so the short-lived CNI process and the daemon share it. */
struct ps_meta_key {
	char container_id[PS_CONTAINER_ID_LEN];
};
struct ps_pod_meta {
	__u32 host_ifindex;
	__u32 pod_ip;  /* network order; 0 for an IPv6-only pod */
	__u16 port_lo;
	__u16 port_hi;
	__u8 protocols;
	__u8 has_slice;
	__u8 _pad[2];
	char slice_key[PS_SLICE_KEY_LEN]; /* "namespace/name", NUL padded */
};

#endif
