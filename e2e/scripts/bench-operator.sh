#!/usr/bin/env bash
# Benchmark: time, API-server requests and operator memory to allocate 1,000 and 10,000 slices
# against a real kube-apiserver + etcd on this machine (a fresh one per run). Prints a table and
# writes it to the operator section of docs/BENCHMARKS.md.
#
# usage: bench-operator.sh [--quick]     (--quick: 200 slices, for CI; does not touch the docs)
#        BENCH_COUNTS="1000 10000" bench-operator.sh
# Targets: 10,000 slices allocated with zero overlap in under 60 s; operator RSS under 50 MB.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

quick=false
[ "${1:-}" = "--quick" ] && quick=true
if $quick; then counts=${BENCH_COUNTS:-200}; else counts=${BENCH_COUNTS:-1000 10000}; fi
DOC=docs/BENCHMARKS.md
BEGIN='<!-- operator-bench:begin -->'
END='<!-- operator-bench:end -->'

work=$(mktemp -d "${TMPDIR:-/tmp}/portslice-bench.XXXXXX")
op_pid=""
cleanup() {
    [ -n "$op_pid" ] && kill "$op_pid" 2>/dev/null || true
    for d in "$work"/api-*; do [ -d "$d" ] && bash e2e/scripts/apiserver.sh stop "$d"; done
    rm -rf "$work"
}
trap cleanup EXIT

# --quick only keeps the benchmark from rotting: reuse the debug build the tests made.
if $quick; then profile=debug; flags=(); else profile=release; flags=(--release); fi
stage "build operator ($profile)" cargo build "${flags[@]}" -q -p portslice-operator --bin portslice-operator --example bench
OPERATOR=target/$profile/portslice-operator
BENCH=target/$profile/examples/bench

# Sum of apiserver_request_total, grouped by "VERB resource[/subresource]".
request_counts() {
    local dir=$1 server
    server=$(sed -n 's/^ *server: //p' "$dir/kubeconfig")
    curl -sf --cacert "$dir/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" "$server/metrics" |
        python3 -c '
import re, sys, collections
c = collections.Counter()
for line in sys.stdin:
    if not line.startswith("apiserver_request_total{"): continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", line))
    res = labels.get("resource", "") + ("/" + labels["subresource"] if labels.get("subresource") else "")
    c[labels.get("verb", "") + " " + res] += float(line.rsplit(" ", 1)[1])
for k, v in sorted(c.items()): print(f"{k}\t{int(v)}")
'
}

# Mean server-side latency per verb/resource (diagnostics, BENCH_LATENCY=1).
request_latency() {
    local dir=$1 server
    server=$(sed -n 's/^ *server: //p' "$dir/kubeconfig")
    curl -sf --cacert "$dir/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" "$server/metrics" |
        python3 -c '
import re, sys, collections
s = collections.Counter(); n = collections.Counter()
for line in sys.stdin:
    m = re.match(r"apiserver_request_duration_seconds_(sum|count)\{(.*)\} (\S+)", line)
    if not m: continue
    labels = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(2)))
    k = labels.get("verb", "") + " " + labels.get("resource", "") + ("/" + labels["subresource"] if labels.get("subresource") else "")
    (s if m.group(1) == "sum" else n)[k] += float(m.group(3))
for k in sorted(n, key=lambda k: -s[k]):
    if n[k] > 100: print(f"{k}: {n[k]:.0f} requests, mean {1000*s[k]/n[k]:.1f} ms, total {s[k]:.1f} s")
'
}

# Requests made during the run: after minus before, for the resources the benchmark touches.
request_delta() {
    python3 - "$1" "$2" <<'EOF'
import sys
def load(p):
    d = {}
    for line in open(p):
        k, v = line.rstrip("\n").split("\t"); d[k] = int(v)
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
keep = ("portslices", "events", "leases", "configmaps", "services", "endpointslices")
delta = {k: b[k] - a.get(k, 0) for k in b if k.split(" ")[1].split("/")[0] in keep and b[k] - a.get(k, 0) > 0}
total = sum(delta.values())
print(total)
print(", ".join(f"{k} {v}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1])))
EOF
}

proc_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

SLIVERS=${BENCH_SLIVERS:-100}
results=()
breakdowns=()
sliver_rows=()
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for n in $counts; do
    dir="$work/api-$n"
    stage "start kube-apiserver + etcd ($n)" bash e2e/scripts/apiserver.sh start "$dir"
    export KUBECONFIG="$dir/kubeconfig"
    metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$OPERATOR" --metrics-addr "127.0.0.1:$metrics_port" --lease-namespace default --concurrency 64 \
        >"$work/operator-$n.log" 2>&1 &
    op_pid=$!
    request_counts "$dir" > "$work/before-$n.tsv"
    log "creating $n slices"
    out=$("$BENCH" --crd crds/portslice.io_portslices.yaml --namespace bench --count "$n" --timeout-secs 600) ||
        { tail -20 "$work/operator-$n.log" >&2; die "benchmark with $n slices failed"; }
    request_counts "$dir" > "$work/after-$n.tsv"
    if [ -n "${BENCH_LATENCY:-}" ]; then request_latency "$dir" >&2; fi
    # Slivers coming and going among the N slices: what each change costs in writes.
    k=$(( SLIVERS < n ? SLIVERS : n ))
    sliver_out=$("$BENCH" --namespace bench --slivers "$k" --timeout-secs 300) ||
        { tail -20 "$work/operator-$n.log" >&2; die "sliver phase with $n slices failed"; }
    request_counts "$dir" > "$work/slivers-$n.tsv"
    { read -r sliver_total; read -r sliver_breakdown; } < <(request_delta "$work/after-$n.tsv" "$work/slivers-$n.tsv")
    sliver_writes=$(python3 - "$work/after-$n.tsv" "$work/slivers-$n.tsv" <<'EOF'
import sys
def load(p):
    return {k: int(v) for k, v in (l.rstrip("\n").split("\t") for l in open(p))}
a, b = load(sys.argv[1]), load(sys.argv[2])
def writes(res):
    return sum(b[k] - a.get(k, 0) for k in b
               if k.split(" ")[1] == res and k.split(" ")[0] in ("POST", "PUT", "PATCH", "APPLY", "DELETE"))
print(writes("endpointslices"), writes("configmaps") + writes("services"), writes("portslices/status"))
EOF
)
    read -r es_w other_w status_w <<<"$sliver_writes"
    changes=$((2 * k))
    log "$n slices, $k slivers up and down ($changes changes): $sliver_out; EndpointSlice writes $es_w, ConfigMap+Service writes $other_w, status writes $status_w ($sliver_breakdown)"
    sliver_rows+=("| $n | $k | $es_w | $(python3 -c "print(f'{$es_w/$k:.2f}')") | $other_w | $status_w |")
    hwm=$(proc_kb "$op_pid" VmHWM); rss=$(proc_kb "$op_pid" VmRSS)
    errors=$(curl -sf "http://127.0.0.1:$metrics_port/metrics" | sed -n 's/^portslice_reconcile_errors_total{error="\([a-z_]*\)"} \([0-9]*\).*/\1=\2/p' | tr '\n' ' ')
    log "operator reconcile errors: ${errors:-none}"
    kill -TERM "$op_pid"; wait "$op_pid" || die "operator did not exit cleanly on SIGTERM"; op_pid=""
    { read -r total; read -r breakdown; } < <(request_delta "$work/before-$n.tsv" "$work/after-$n.tsv")
    secs=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["allocated_secs"])' "$out")
    overlaps=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["overlaps"])' "$out")
    log "$n slices: $out; requests $total ($breakdown); RSS ${rss} kB (peak ${hwm} kB)"
    results+=("| $n | $secs | $overlaps | $total | $(python3 -c "print(f'{$total/$n:.1f}')") | $((rss / 1024)) | $((hwm / 1024)) |")
    bash e2e/scripts/apiserver.sh stop "$dir"
    breakdowns+=("- $n slices: $breakdown")
done

table=$(
    echo "Allocating N PortSlices (size 1, pool 40000-59999) against a local kube-apiserver $K8S_VERSION + etcd $(etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p');"
    echo "slices created by 64 concurrent clients; time from the first create until every slice holds a range."
    echo "Requests: apiserver_request_total for portslices, events and leases, all clients: the N POSTs are the benchmark's"
    echo "creates; the operator writes twice per slice (finalizer PATCH, status APPLY; Normal Allocated Events are off by default),"
    echo "plus what it publishes (below)."
    echo
    echo "| slices | seconds until all allocated | overlaps | API requests | requests / slice | operator RSS (MB) | peak RSS (MB) |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${results[@]}"
    echo
    echo "Request breakdown:"
    printf '%s\n' "${breakdowns[@]}"
    echo
    echo "Publishing is on (the default): each allocated slice also gets its ConfigMap, headless Service and EndpointSlice (3 creates). Then, among the N allocated slices, pods for $SLIVERS of them appear (status written as a kubelet would) and go. Each pod's endpoint changes three times: ready, terminating (the API server marks a bound pod deleted before it removes it), gone; one write per change is 3 per pod (2 when the last two land in one reconcile)."
    echo
    echo "| slices | pods up and down | EndpointSlice writes | per pod | ConfigMap + Service writes | PortSlice status writes |"
    echo "|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${sliver_rows[@]}"
    echo
    echo "Measured $(date -u +%Y-%m-%d) on $(uname -n): $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(free -g | awk '/^Mem:/ {print $2}') GB RAM, kernel $(uname -r); load average before the run $load_before (the machine is shared, so absolute times vary). Targets: 10,000 in < 60 s, RSS < 50 MB."
)
echo
echo "$table"

if ! $quick; then
    mkdir -p docs
    [ -f "$DOC" ] || printf '# Benchmarks\n\n' > "$DOC"
    if ! grep -qF "$BEGIN" "$DOC"; then
        printf '\n## Operator\n\n%s\n%s\n' "$BEGIN" "$END" >> "$DOC"
    fi
    python3 - "$DOC" "$BEGIN" "$END" "$table" <<'EOF'
import sys
path, begin, end, table = sys.argv[1:5]
text = open(path).read()
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open(path, "w").write(f"{head}{begin}\n{table}\n{end}{tail}")
EOF
    log "wrote the operator section of $DOC"
fi
