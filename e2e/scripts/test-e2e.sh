#!/usr/bin/env bash
# The e2e stage of `make test`: local single-node cluster (cached binaries), images, then the
# Rust e2e suite (which itself does helm install/upgrade/uninstall), logs on failure, cluster
# down. A cluster that was already up (e.g. from `make up`) is reused and left running.
#
# env: PORTSLICE_E2E_SKIP=check,...   skip checks by name (reported as "not run")
#      PORTSLICE_E2E_KEEP=1           leave the cluster up afterwards
#      E2E_ARTIFACTS=DIR              where logs go on failure (default: .e2e-state/artifacts)
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/cluster-env.sh"
cd "$REPO_ROOT"

ARTIFACTS=${E2E_ARTIFACTS:-$REPO_ROOT/.e2e-state/artifacts}
was_up=0
bash e2e/scripts/cluster.sh status >/dev/null 2>&1 && was_up=1

collect_logs() {
    rm -rf "$ARTIFACTS"; mkdir -p "$ARTIFACTS"
    cp -r "$E2E_STATE/logs" "$ARTIFACTS/cluster-logs" 2>/dev/null || true
    kubectl_e2e get all,portslices,events -A -o wide > "$ARTIFACTS/objects.txt" 2>&1 || true
    kubectl_e2e describe pods -A > "$ARTIFACTS/pods-describe.txt" 2>&1 || true
    local ns pod
    kubectl_e2e get pods -A --no-headers -o custom-columns=NS:.metadata.namespace,NAME:.metadata.name 2>/dev/null |
        while read -r ns pod; do
            kubectl_e2e -n "$ns" logs "$pod" --all-containers --prefix > "$ARTIFACTS/log-$ns-$pod.txt" 2>&1 || true
        done
    cp "$CNI_CONF_DIR"/* "$ARTIFACTS/" 2>/dev/null || true
    log "logs collected in $ARTIFACTS"
}

finish() {
    local rc=$?
    [ $rc -ne 0 ] && collect_logs
    if [ $was_up -eq 0 ] && [ "${PORTSLICE_E2E_KEEP:-0}" != 1 ]; then
        stage cluster-down bash e2e/scripts/cluster.sh down || true
    fi
    exit $rc
}
trap finish EXIT

suite() {
    PORTSLICE_E2E=1 KUBECONFIG=$E2E_KUBECONFIG \
    PORTSLICE_E2E_NODE_IP=$NODE_IP PORTSLICE_E2E_REMOTE_IP=$REMOTE_IP \
    PORTSLICE_E2E_REMOTE_EXEC="ip netns exec $REMOTE_NETNS" PORTSLICE_E2E_UPLINK=$UPLINK \
    PORTSLICE_E2E_REMOTE_NAME=$REMOTE_NAME PORTSLICE_E2E_HELM=$TOOLS_BIN/helm \
    PORTSLICE_E2E_KUBECTL=$K8S_BIN/kubectl \
        cargo test -p portslice-e2e --test e2e
}

stage cluster-up bash e2e/scripts/cluster.sh up
stage helm-tool bash e2e/scripts/build-tools.sh helm
stage images bash e2e/scripts/images.sh
stage suite suite
