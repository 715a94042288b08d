#!/usr/bin/env bash
# The e2e stage of `make test`: the kind cluster of kind.sh (1 control plane + 2 workers, built
# here), the images (reusing the tests' debug build), then the Rust e2e suite, which itself
# installs, upgrades and uninstalls the chart and drains and deletes a node. Logs are collected on
# failure; the cluster goes down afterwards, unless it was up before (e.g. from `make up`).
#
# env: PORTSLICE_E2E_SKIP=check,...   skip checks by name (reported as "not run")
#      PORTSLICE_E2E_KEEP=1           leave the cluster up afterwards
#      E2E_ARTIFACTS=DIR              where logs go on failure (default: .e2e-state/artifacts)
#      IMAGE_PROFILE=release          build the images in release mode instead
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

ARTIFACTS=${E2E_ARTIFACTS:-$REPO_ROOT/.e2e-state/artifacts}
export IMAGE_PROFILE=${IMAGE_PROFILE:-debug}
was_up=0
bash e2e/scripts/kind.sh status >/dev/null 2>&1 && was_up=1

collect_logs() {
    rm -rf "$ARTIFACTS"; mkdir -p "$ARTIFACTS"
    kubectl get nodes,all,portslices,events -A -o wide > "$ARTIFACTS/objects.txt" 2>&1 || true
    kubectl describe nodes,pods -A > "$ARTIFACTS/describe.txt" 2>&1 || true
    local ns pod node
    kubectl get pods -A --no-headers -o custom-columns=NS:.metadata.namespace,NAME:.metadata.name 2>/dev/null |
        while read -r ns pod; do
            kubectl -n "$ns" logs "$pod" --all-containers --prefix > "$ARTIFACTS/log-$ns-$pod.txt" 2>&1 || true
        done
    for node in $(docker ps --filter label=io.x-k8s.kind.cluster=portslice --format '{{.Names}}' 2>/dev/null); do
        docker exec "$node" sh -c 'cat /etc/cni/net.d/*.conflist' > "$ARTIFACTS/cni-$node.txt" 2>&1 || true
        docker exec "$node" journalctl -u kubelet --no-pager -n 300 > "$ARTIFACTS/kubelet-$node.txt" 2>&1 || true
    done
    log "logs collected in $ARTIFACTS"
}

finish() {
    local rc=$?
    [ $rc -ne 0 ] && collect_logs
    if [ $was_up -eq 0 ] && [ "${PORTSLICE_E2E_KEEP:-0}" != 1 ]; then
        stage kind-down bash e2e/scripts/kind.sh down || true
    fi
    exit $rc
}
trap finish EXIT

stage helm-tool bash e2e/scripts/build-tools.sh helm
stage kind-up bash e2e/scripts/kind.sh up
eval "$(bash e2e/scripts/kind.sh env)"
stage images bash e2e/scripts/images.sh
stage kind-load bash e2e/scripts/kind.sh load
stage suite env PORTSLICE_E2E=1 cargo test -p portslice-e2e --test e2e
