/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The one definition of every map key/value PortSlice's eBPF programs share with user space.
 * Mirrored field for field by src/datapath/abi.rs; a test there checks sizes and offsets agree.
 * All structs are naturally aligned with explicit padding so C and Rust lay them out the same.
 * IPv4 addresses are in network byte order; ports and ICMP ids in the port table are host order.
 */
#ifndef PORTSLICE_ABI_H
#define PORTSLICE_ABI_H

#include <linux/types.h>

/* Port table: one slot per (protocol, port). key = proto * 65536 + port. */
#define PS_PROTO_TCP 0
#define PS_PROTO_UDP 1
#define PS_PORT_TABLE_SIZE (2 * 65536)

#define PS_MAX_PODS 4096
#define PS_FRAG_ENTRIES 8192
#define PS_ECHO_ENTRIES 16384
#define PS_CONTAINER_ID_LEN 128
#define PS_SLICE_KEY_LEN 256

/* ps_port_owner.flags / ps_pod_info.flags */
#define PS_F_PEER 0x1  /* host ifindex is a veth: bpf_redirect_peer into its peer */
#define PS_F_SLICE 0x2 /* the pod holds a slice (else: steering only, matrix row 4) */

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
#define PS_G_MAX 8

/* Map "config", ARRAY[1]. Written once by the daemon. */
struct ps_node_config {
	__u32 node_ip;        /* network order; 0 = datapath disabled */
	__u32 uplink_ifindex; /* informational */
};

/* Map "port_owner", ARRAY[PS_PORT_TABLE_SIZE]. host_ifindex 0 = port not in any slice. */
struct ps_port_owner {
	__u32 host_ifindex;
	__u32 flags; /* PS_F_* */
};

/* Map "pods", HASH keyed by __u32 host veth ifindex. */
struct ps_pod_info {
	__u32 flags;   /* PS_F_* */
	__u32 pod_ip;  /* private address from the primary CNI, network order */
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
	__u64 drop_src_port; /* node-address packets with a source port outside the slice */
	__u64 drop_other;    /* other node-address packets refused (protocol, fragments) */
};

/* Map "frags", LRU_HASH: the first fragment's verdict, for the fragments that carry no ports. */
struct ps_frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 ip_id;
	__u8 proto;
	__u8 dir; /* 0 = towards the pod, 1 = from the pod */
};
struct ps_frag_val {
	__u32 host_ifindex;
	__u32 flags;
};

/* Map "echo_ids", LRU_HASH: ICMP echo ids rewritten into the pod's own range on the way out. */
struct ps_echo_key {
	__u32 remote_ip; /* network order */
	__u16 id;        /* rewritten id, network order */
	__u16 _pad;
};
struct ps_echo_val {
	__u32 host_ifindex;
	__u32 flags;
	__u16 orig_id; /* network order */
	__u16 _pad[3];
};

/* Map "pod_meta", HASH keyed by container id: control-plane bookkeeping only, never read by the
 * programs. It lives in a pinned map so the short-lived CNI process and the daemon share it. */
struct ps_meta_key {
	char container_id[PS_CONTAINER_ID_LEN];
};
struct ps_pod_meta {
	__u32 host_ifindex;
	__u32 pod_ip;  /* network order */
	__u16 port_lo;
	__u16 port_hi;
	__u8 protocols;
	__u8 has_slice;
	__u8 _pad[2];
	char slice_key[PS_SLICE_KEY_LEN]; /* "namespace/name", NUL padded */
};

#endif
