#!/usr/bin/env bash
# The same e2e suite on kind, for machines with Docker (not this one: it has no Docker, so this
# script has not been run here). Creates a kind cluster, loads the images built by images.sh,
# and runs the suite with the docker host as the "remote host" and `docker exec` into the node
# for the node-side checks.
#
# needs: docker, kind, kubectl, helm in PATH; the eBPF datapath needs a host kernel >= 6.6 (tcx)
# and bpffs mounted at /sys/fs/bpf on the host (kind nodes share the host's kernel).
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

CLUSTER=${KIND_CLUSTER:-portslice-e2e}
# kind publishes node images per Kubernetes release; pick one that matches your kind version.
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.34.0}
NODE=$CLUSTER-control-plane
for tool in docker kind kubectl helm; do command -v "$tool" >/dev/null || die "$tool is required"; done

kind get clusters | grep -qx "$CLUSTER" || stage kind-create kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE"
stage images bash e2e/scripts/images.sh --no-import
for t in portslice-operator portslice-node portslice-e2e-agent; do
    stage "kind-load-$t" kind load image-archive "$PORTSLICE_CACHE/images/$t.tar" --name "$CLUSTER"
done

node_ip=$(docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' "$NODE")
# The docker host is the remote host: its address on the kind network is the gateway.
remote_ip=$(docker network inspect kind -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' | tr ' ' '\n' | grep -m1 '\.')
export KUBECONFIG=${KUBECONFIG:-$HOME/.kube/config}
kubectl config use-context "kind-$CLUSTER" >/dev/null

export PORTSLICE_E2E=1 PORTSLICE_E2E_NODE_IP=$node_ip PORTSLICE_E2E_REMOTE_IP=$remote_ip
export PORTSLICE_E2E_REMOTE_EXEC="" PORTSLICE_E2E_NODE_EXEC="docker exec $NODE"
export PORTSLICE_E2E_UPLINK=eth0 PORTSLICE_E2E_REMOTE_NAME=none
export PORTSLICE_E2E_HELM=$(command -v helm) PORTSLICE_E2E_KUBECTL=$(command -v kubectl)
stage suite cargo test -p portslice-e2e --test e2e
[ "${KIND_KEEP:-0}" = 1 ] || stage kind-delete kind delete cluster --name "$CLUSTER"
