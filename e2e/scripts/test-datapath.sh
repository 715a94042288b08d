#!/usr/bin/env bash
# Every privileged test of cni-plugin (issue 4), in network namespaces the tests create:
#   cni_protocol  the CNI protocol at the process boundary (error codes, versions, VERSION/GC/STATUS)
#   cni_chain     the plugin chained behind ptp/bridge + host-local at every CNI version (Debian's
#                 plugins up to 1.0.0, a newer release for 1.1.0), through cnitool and podman
#   cni_kube      slices read from a real kube-apiserver + etcd (started here, on loopback)
#   matrix        every row of DESIGN.md's connectivity matrix with pods made by the CNI chain
#   datapath_*    the eBPF datapath, its loader and the node daemon with plain veths
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

stage "build" cargo test -p portslice-cni --no-run
stage "unit" cargo test -p portslice-cni --lib --bins

apiserver_dir=$(mktemp -d "${TMPDIR:-/tmp}/portslice-cni-apiserver.XXXXXX")
cleanup() {
    bash "$REPO_ROOT/e2e/scripts/apiserver.sh" stop "$apiserver_dir" >/dev/null 2>&1 || true
    rm -rf "$apiserver_dir"
}
trap cleanup EXIT
stage "start kube-apiserver + etcd" bash e2e/scripts/apiserver.sh start "$apiserver_dir"

# One stage per test binary, so a failure names its suite and the timings show where time goes.
# The benchmark (datapath_bench) is #[ignore]d here and run by bench-datapath.sh.
stage "test cni_kube" env KUBECONFIG="$apiserver_dir/kubeconfig" PORTSLICE_REQUIRE_KUBE=1 \
    cargo test -p portslice-cni --test cni_kube -- --nocapture
suites=(cni_protocol cni_chain matrix)
for f in cni-plugin/tests/datapath_*.rs; do
    suites+=("$(basename "$f" .rs)")
done
for suite in "${suites[@]}"; do
    stage "test $suite" cargo test -p portslice-cni --test "$suite"
done
