#!/usr/bin/env bash
# The operator's integration tests against a real kube-apiserver + etcd started here.
# usage: test-operator.sh [extra cargo test args, e.g. a test name filter]
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

total_start=$SECONDS
dir=$(mktemp -d "${TMPDIR:-/tmp}/portslice-apiserver.XXXXXX")
cleanup() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        log "failed; last lines of the API server log:"
        tail -n 20 "$dir/apiserver.log" 2>/dev/null >&2 || true
    fi
    bash "$REPO_ROOT/e2e/scripts/apiserver.sh" stop "$dir" || true
    rm -rf "$dir"
    log "test-operator.sh took $((SECONDS - total_start))s in total (exit $rc)"
}
trap cleanup EXIT

# Build first so compile time does not count against the API server, and so a compile error
# fails before anything is started.
stage "build operator and tests" cargo test -p portslice-operator --tests --no-run
stage "start kube-apiserver + etcd" bash "$REPO_ROOT/e2e/scripts/apiserver.sh" start "$dir"
export KUBECONFIG="$dir/kubeconfig"
# Each test runs its own operator process; a few at a time keeps a 2-core machine responsive.
stage "operator integration tests" cargo test -p portslice-operator --tests "$@" -- --test-threads "${TEST_THREADS:-4}"
