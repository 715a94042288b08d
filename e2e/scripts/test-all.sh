#!/usr/bin/env bash
# Every test PortSlice has, in the order a failure is cheapest to find: what `make test` and
# .ci/run run. Each stage prints its duration; a summary table closes the run.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

summary=()
run_stage() {
    local name=$1; shift
    local start=$SECONDS
    log "=== stage $name"
    if "$@"; then
        summary+=("$(printf '%-16s %5ss  ok' "$name" "$((SECONDS - start))")")
    else
        summary+=("$(printf '%-16s %5ss  FAILED' "$name" "$((SECONDS - start))")")
        print_summary
        die "stage $name failed"
    fi
}
print_summary() {
    log "=== stage timings"
    printf '%s\n' "${summary[@]}" >&2
}

toolchain() {
    apt_install clang llvm libbpf-dev bpftool iproute2 openssl
    bash e2e/scripts/build-k8s.sh
    bash e2e/scripts/build-tools.sh
}
# The README's kind quickstart is literally e2e/scripts/quickstart.sh (what `make up` runs).
quickstart_in_readme() {
    diff <(sed -n '/^# >>> quickstart$/,/^# <<< quickstart$/p' e2e/scripts/quickstart.sh | sed '1d;$d') \
        <(sed -n '/^<!-- quickstart:kind -->$/,/^<!-- \/quickstart:kind -->$/p' README.md | sed '1,2d' | sed '$d' | sed '$d') ||
        die "README.md's kind quickstart and e2e/scripts/quickstart.sh differ (diff above)"
}
lint() {
    quickstart_in_readme
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    "$TOOLS_BIN/helm" lint charts/portslice
    # The chart's own tests (helm, no cluster): pools vs the Rust rule, the CRD, monitors with and
    # without the Prometheus Operator's API, the values schema, the dashboard JSON.
    PORTSLICE_E2E_HELM="$TOOLS_BIN/helm" cargo test -p portslice-e2e --test chart
}
unit() {
    cargo test --workspace --lib --bins
    cargo test -p portslice-crds --tests
}
bench_quick() {
    # A short benchmark run so the benchmarks never rot; it asserts nothing about speed.
    bash e2e/scripts/bench-operator.sh --quick
    bash e2e/scripts/bench-datapath.sh --quick
}

run_stage toolchain toolchain
run_stage lint lint
run_stage unit unit
run_stage operator bash e2e/scripts/test-operator.sh
run_stage datapath bash e2e/scripts/test-datapath.sh
run_stage e2e bash e2e/scripts/test-e2e.sh
run_stage bench-quick bench_quick
print_summary
