# Where the local single-node cluster lives and how it is wired. Sourced by cluster.sh and the
# scripts that use the cluster (images.sh, test-e2e.sh, up.sh). Every value can be overridden
# from the environment.
#
# The node never uses the machine's real interface for test traffic: its address sits on one end
# of a veth pair whose other end is in a "remote host" network namespace made here, and all test
# traffic flows between that namespace, the node and its pods. 198.18.0.0/15 is the benchmarking
# range (RFC 2544), so these addresses exist only on this machine.
E2E_STATE=${E2E_STATE:-/var/lib/portslice-e2e}
E2E_RUN=${E2E_RUN:-/run/portslice-e2e}
NODE_NAME=${NODE_NAME:-portslice-node}
UPLINK=${UPLINK:-psuplink0}
NODE_IP=${NODE_IP:-198.18.0.1}
REMOTE_NETNS=${REMOTE_NETNS:-ps-remote}
REMOTE_IP=${REMOTE_IP:-198.18.0.2}
UPLINK_PREFIX=${UPLINK_PREFIX:-24}
POD_CIDR=${POD_CIDR:-10.244.0.0/24}
CLUSTER_CIDR=${CLUSTER_CIDR:-10.244.0.0/16}
SERVICE_CIDR=${SERVICE_CIDR:-10.96.0.0/16}
KUBERNETES_SVC_IP=${KUBERNETES_SVC_IP:-10.96.0.1}
CLUSTER_DNS_IP=${CLUSTER_DNS_IP:-10.96.0.10}
# Ports away from the defaults, so an API server or etcd another test starts does not clash.
APISERVER_PORT=${APISERVER_PORT:-16443}
ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT:-12379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-12380}
CONTAINERD_SOCK=${CONTAINERD_SOCK:-$E2E_RUN/containerd.sock}
CNI_CONF_DIR=${CNI_CONF_DIR:-/etc/cni/net.d}
CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}
CNI_CONFLIST=${CNI_CONFLIST:-$CNI_CONF_DIR/10-portslice-e2e.conflist}
PAUSE_IMAGE=${PAUSE_IMAGE:-localhost/portslice/pause:e2e}
BUSYBOX_IMAGE=${BUSYBOX_IMAGE:-localhost/portslice/busybox:e2e}
COREDNS_VERSION=${COREDNS_VERSION:-1.12.1}
COREDNS_IMAGE=${COREDNS_IMAGE:-localhost/portslice/coredns:v$COREDNS_VERSION}
CRICTL_VERSION=${CRICTL_VERSION:-1.34.0}
E2E_KUBECONFIG=${E2E_KUBECONFIG:-$E2E_STATE/pki/admin.kubeconfig}
# A name the cluster DNS answers for the remote host, so pods can resolve it.
REMOTE_NAME=${REMOTE_NAME:-remote.portslice.test}

kubectl_e2e() { "$K8S_BIN/kubectl" --kubeconfig "$E2E_KUBECONFIG" "$@"; }
