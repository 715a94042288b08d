#!/usr/bin/env bash
# Datapath benchmark (issue 4): host networking vs a slice pod vs a pod behind the reference
# portmap plugin's NAT, then with 10,000 ports allocated (10,000-port slice vs 10,000 iptables
# DNAT rules vs one nftables DNAT rule over a 10,000-entry map), plus the datapath part of CNI
# ADD/DEL. Everything runs in network namespaces it creates (cni-plugin/testkit).
#
#   e2e/scripts/bench-datapath.sh           full run (5 s per measurement), writes the table into
#                                           docs/BENCHMARKS.md between the datapath-bench markers
#   e2e/scripts/bench-datapath.sh --quick   short run for CI: prints the table, asserts nothing
#                                           about speed, writes nothing
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        *) die "unknown argument $arg (use --quick)" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "the datapath benchmark needs root (network namespaces, eBPF)"

stage "install tools" apt_install clang llvm libbpf-dev iproute2 iperf3 conntrack iptables nftables \
    containernetworking-plugins util-linux
stage "bpffs" ensure_bpffs

cd "$REPO_ROOT"
# Release build: the clients and servers of the benchmark are Rust code in the test binary,
# which then runs directly (not through cargo, so another build holding cargo's lock on the
# shared target dir cannot stall or skew the measurement). --quick only keeps the benchmark from
# rotting and asserts nothing about speed: it reuses the tests' debug build.
profile_flag=(--release)
[ "$quick" -eq 1 ] && profile_flag=()
build() {
    # Not `tee /dev/stderr`: when stderr is a file, opening it again truncates the whole log.
    local out status=0
    out=$(cargo test -p portslice-cni "${profile_flag[@]}" --test bench --no-run 2>&1) || status=$?
    printf '%s\n' "$out" >&2
    [ "$status" -eq 0 ] || return "$status"
    printf '%s\n' "$out" | sed -n 's/.*Executable .*(\(.*\))$/\1/p' > "$bin_file"
}
bin_file=$(mktemp)
trap 'rm -f "$bin_file"' EXIT
stage "build" build
bench_bin=$(cat "$bin_file")
[ -x "$bench_bin" ] || die "benchmark binary not found in cargo's output"
case "$bench_bin" in /*) ;; *) bench_bin="$REPO_ROOT/$bench_bin" ;; esac

run_bench() {
    if [ "$quick" -eq 1 ]; then
        PORTSLICE_BENCH_QUICK=1 "$bench_bin" --ignored --exact datapath_benchmark --nocapture --test-threads=1
    else
        PORTSLICE_BENCH_OUT="$REPO_ROOT/docs/BENCHMARKS.md" "$bench_bin" --ignored --exact datapath_benchmark --nocapture \
            --test-threads=1
    fi
}
stage "datapath benchmark" run_bench

# CNI ADD with a live API server (issue 14): the pod's slice from the node daemon's cache vs
# from the API server, through the real binary, as the node test measures it (release build,
# 50 runs each). The full run only: --quick leaves it to the node tests (test-datapath.sh).
live_add() {
    local out status=0 node_bin api line
    out=$(cargo test -p portslice-cni --release --test node --no-run 2>&1) || status=$?
    [ "$status" -eq 0 ] || { printf '%s\n' "$out" >&2; return "$status"; }
    node_bin=$(printf '%s\n' "$out" | sed -n 's/.*Executable .*(\(.*\))$/\1/p')
    case "$node_bin" in /*) ;; *) node_bin="$REPO_ROOT/$node_bin" ;; esac
    api=$(mktemp -d "${TMPDIR:-/tmp}/portslice-bench-api.XXXXXX")
    bash e2e/scripts/apiserver.sh start "$api" >&2
    out=$(KUBECONFIG="$api/kubeconfig" PORTSLICE_CACHE_LATENCY_RUNS=50 "$node_bin" --nocapture \
        --test-threads=1 kube::add_finds_the_slice_in_the_nodes_cache 2>&1) || status=$?
    bash e2e/scripts/apiserver.sh stop "$api" >&2
    rm -rf "$api"
    printf '%s\n' "$out" >&2
    [ "$status" -eq 0 ] || return "$status"
    line=$(printf '%s\n' "$out" | grep -o -m1 "CNI ADD with the pod's slice from the node's cache.*")
    [ -n "$line" ] || die "the node test printed no latency line"
    python3 - "$REPO_ROOT/docs/BENCHMARKS.md" "$line" <<'PY'
import sys
path, line = sys.argv[1], sys.argv[2]
begin, end = "<!-- cni-live-bench:begin -->", "<!-- cni-live-bench:end -->"
body = (f"{begin}\nCNI ADD through the real binary with a live API server (a local kube-apiserver"
        f" + etcd, the node daemon watching it; node test `kube::add_finds_the_slice_in_the_nodes_cache...`):"
        f" {line.removeprefix('CNI ADD with ')}.\n{end}")
cur = open(path).read()
a, b = cur.find(begin), cur.find(end)
if 0 <= a < b:
    cur = cur[:a] + body + cur[b + len(end):]
else:
    cur = cur.replace("<!-- datapath-bench:end -->", "<!-- datapath-bench:end -->\n\n" + body, 1)
open(path, "w").write(cur)
PY
}
if [ "$quick" -eq 0 ]; then
    stage "helm (the node test takes the node's RBAC from the chart)" bash e2e/scripts/build-tools.sh helm
    stage "CNI ADD with a live API server" live_add
fi
