#!/usr/bin/env bash
# Every privileged test of the node side (cni-plugin/tests/node, one binary), in network
# namespaces the tests create, one stage per suite:
#   kube             slices read from a real kube-apiserver + etcd (started here, on loopback)
#   protocol         the CNI protocol at the process boundary (error codes, versions, pass-through)
#   chain            the plugin chained behind ptp/bridge + host-local at every CNI version (Debian's
#                    plugins up to 1.0.0, a newer release for 1.1.0), through cnitool and podman
#   cni_matrix       every row of docs/DESIGN.md's connectivity matrix, pods made by the CNI chain
#   veth_matrix      the same rows with plain veths, plus PMTU and zero conntrack
#   cni_matrix6, veth_matrix6  every row on an IPv6-only node (2001:2::/48), both pod paths
#   dual_stack       a node sharing both addresses: one pod on both, pods of one family
#   node_ports, hardening  the node's own ports and listeners; ICMP/fragment/source hardening
#   upgrade          nodes of earlier releases taken over under a running transfer
#   daemon, clsact   the node daemon, and the attach fallback for kernels without tcx
# Needs root (CI runs as root); installs what the tests need. Prints stage timings.
#
#   e2e/scripts/test-datapath.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

[ "$(id -u)" -eq 0 ] || die "the datapath and CNI tests need root (network namespaces, eBPF)"

stage "install tools" apt_install clang llvm libbpf-dev bpftool iproute2 containernetworking-plugins \
    iperf3 socat conntrack nftables iptables util-linux podman busybox-static
stage "bpffs" ensure_bpffs
stage "cnitool and CNI 1.1.0 plugins" bash e2e/scripts/build-tools.sh cnitool cni-plugins
export TOOLS_BIN CNI_PLUGINS_DIR
[ -x /usr/lib/cni/ptp ] || die "Debian's reference CNI plugins are missing from /usr/lib/cni"

stage "build" cargo test -p portslice-netns -p portslice-datapath -p portslice-cni --no-run
stage "unit" cargo test -p portslice-netns -p portslice-datapath -p portslice-cni --lib --bins

apiserver_dir=$(mktemp -d "${TMPDIR:-/tmp}/portslice-cni-apiserver.XXXXXX")
cleanup() {
    bash "$REPO_ROOT/e2e/scripts/apiserver.sh" stop "$apiserver_dir" >/dev/null 2>&1 || true
    rm -rf "$apiserver_dir"
}
trap cleanup EXIT
stage "start kube-apiserver + etcd" bash e2e/scripts/apiserver.sh start "$apiserver_dir"

# One stage per suite (a module of the one test binary), so a failure names its suite and the
# timings show where time goes. The benchmark (tests/bench.rs) is run by bench-datapath.sh.
stage "test kube" env KUBECONFIG="$apiserver_dir/kubeconfig" \
    cargo test -p portslice-cni --test node -- kube:: --nocapture
for suite in protocol chain cni_matrix veth_matrix cni_matrix6 veth_matrix6 dual_stack node_ports \
    hardening upgrade daemon clsact; do
    stage "test $suite" cargo test -p portslice-cni --test node -- "$suite::"
done
