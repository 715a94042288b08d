#!/usr/bin/env bash
# `make up`: the whole thing on this machine in one command: the README's kind quickstart
# (e2e/scripts/quickstart.sh, literally), then proof that it serves: every example slice gets a
# range, its pods run, and the remote host (the docker host) reaches a slice pod on its node's
# address over TCP and UDP. Safe to rerun: an existing cluster and release are upgraded in place.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

total=$SECONDS
stage toolchain bash e2e/scripts/build-k8s.sh
stage helm-tool bash e2e/scripts/build-tools.sh helm
if bash e2e/scripts/kind.sh status >/dev/null 2>&1; then
    eval "$(bash e2e/scripts/kind.sh env)"
    helm status portslice -n portslice-system >/dev/null 2>&1 &&
        stage helm-uninstall-previous helm uninstall portslice -n portslice-system --wait
fi
stage quickstart bash e2e/scripts/quickstart.sh
eval "$(bash e2e/scripts/kind.sh env)"

prove() {
    local s
    for s in $(kubectl -n portslice-demo get portslices -o name); do
        kubectl -n portslice-demo wait "$s" --for=jsonpath='{.status.rangeText}' --timeout=60s >/dev/null ||
            die "$s has no range (is the operator running? kubectl -n portslice-system logs deploy/portslice-operator)"
    done
    kubectl -n portslice-demo wait pods --all --for=condition=Ready --timeout=180s >/dev/null ||
        die "not every example pod is Ready: $(kubectl -n portslice-demo get pods --no-headers | tr '\n' ';')"
    kubectl get portslices -A -o wide
    local start pod node ip
    start=$(kubectl -n portslice-demo get portslice media -o jsonpath='{.status.range.start}')
    pod=$(kubectl -n portslice-demo get pods -l app=media -o jsonpath='{.items[0].metadata.name}')
    node=$(kubectl -n portslice-demo get pod "$pod" -o jsonpath='{.spec.nodeName}')
    ip=$(kubectl -n portslice-demo get pod "$pod" -o jsonpath='{.status.hostIP}')
    log "from the remote host ($PORTSLICE_E2E_REMOTE_IP): tcp and udp to $ip:$start (slice media, pod $pod on $node)"
    target/release/portslice-e2e-agent dial tcp "$ip:$start"
    target/release/portslice-e2e-agent dial udp "$ip:$start"
    log "a slice pod answered on its node's address; KUBECONFIG=$KUBECONFIG"
}
stage prove prove
log "up in $((SECONDS - total))s"
