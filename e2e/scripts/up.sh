#!/usr/bin/env bash
# `make up`: the whole thing on this machine in one command. Builds what is missing, starts the
# local single-node cluster, builds and imports the images, installs the chart, applies
# examples/, prints the allocated ranges and proves a slice pod answering on the node address
# from the remote host's network namespace.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/cluster-env.sh"
cd "$REPO_ROOT"

RELEASE=${RELEASE:-portslice}
RELEASE_NS=${RELEASE_NS:-portslice-system}
AGENT=$REPO_ROOT/target/release/portslice-e2e-agent

# The image tags stay "dev"; the tars' digests as pod annotations roll the pods when a rebuilt
# image was imported.
digest() { sha256sum "$PORTSLICE_CACHE/images/$1.tar" | cut -c1-16; }

helm_install() {
    "$TOOLS_BIN/helm" --kubeconfig "$E2E_KUBECONFIG" upgrade --install "$RELEASE" charts/portslice \
        -n "$RELEASE_NS" --create-namespace --wait --timeout 5m \
        --set node.uplink="$UPLINK" \
        --set-string operator.podAnnotations.imageDigest="$(digest portslice-operator)" \
        --set-string node.podAnnotations.imageDigest="$(digest portslice-node)" "$@"
}

examples() {
    kubectl_e2e apply -f examples/
    local s
    for s in $(kubectl_e2e -n portslice-demo get portslices -o name); do
        kubectl_e2e -n portslice-demo wait "$s" --for=jsonpath='{.status.rangeText}' --timeout=60s >/dev/null 2>&1 ||
            log "warning: $s has no range yet"
    done
    kubectl_e2e -n portslice-demo wait pods --all --for=condition=Ready --timeout=120s >/dev/null ||
        log "warning: not every example pod is Ready"
}

prove() {
    kubectl_e2e get portslices -A -o wide
    local range start
    range=$(kubectl_e2e -n portslice-demo get portslice media -o jsonpath='{.status.range.start}')
    [ -n "$range" ] || die "slice media has no range (is the operator running?)"
    start=$range
    log "from netns $REMOTE_NETNS ($REMOTE_IP): tcp and udp to $NODE_IP:$start"
    ip netns exec "$REMOTE_NETNS" "$AGENT" dial tcp "$NODE_IP:$start"
    ip netns exec "$REMOTE_NETNS" "$AGENT" dial udp "$NODE_IP:$start"
    log "a slice pod answered on the node address; KUBECONFIG=$E2E_KUBECONFIG"
}

total=$SECONDS
stage kubernetes-binaries bash e2e/scripts/build-k8s.sh
stage helm-tool bash e2e/scripts/build-tools.sh helm
stage cluster-up bash e2e/scripts/cluster.sh up
stage images bash e2e/scripts/images.sh
stage helm-install helm_install "$@"
stage examples examples
stage prove prove
log "up in $((SECONDS - total))s"
