#!/usr/bin/env bash
# A real 3-node kind cluster on this machine (1 control plane, 2 workers), from nothing: dockerd
# (docker.sh), kind and a node image built here without registries (kind-image.sh), the `kind`
# docker network inside 198.18.0.0/15 and 2001:2::/48 (dual stack), `kind create cluster` with
# e2e/kind/cluster.yaml, then a primary CNI of kindnet's form and CoreDNS answering
# remote.portslice.test.
#
# Networking, as kindnet would do it (kindnetd's image cannot be fetched here):
#   - /etc/cni/net.d/10-kindnet.conflist on each node (ptp + host-local with one range per
#     spec.podCIDRs family, portmap), written once: a chained plugin (PortSlice) may extend it;
#   - on each node a route to every other node's pod CIDRs via that node's address of the family;
#   - nat chain KIND-MASQ-AGENT (iptables and ip6tables): traffic leaving for outside the pod
#     CIDRs is masqueraded.
# The docker host is the "remote host": it sits on the kind network at the gateway address.
# The kind network does not masquerade to the machine's uplink (nothing here may go out).
#
# usage: kind.sh up|down|env|load [TAR...]|status
#   up      idempotent; prints the env at the end
#   down    deletes the cluster and the kind network, stops dockerd, restores the host
#   env     `eval "$(kind.sh env)"`: KUBECONFIG, node names/IPs, remote IP, uplink, e2e variables
#   load    kind load image-archive of the given tars (default: the three PortSlice images)
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

CLUSTER=${KIND_CLUSTER:-portslice}
KIND_RUN=${KIND_RUN:-/run/portslice-kind}
KIND_KUBECONFIG=${KIND_KUBECONFIG:-$KIND_RUN/kubeconfig}
KIND_CONFIG=${KIND_CONFIG:-$REPO_ROOT/e2e/kind/cluster.yaml}
KIND_NETWORK=kind
KIND_SUBNET=${KIND_SUBNET:-198.19.0.0/24}
KIND_GATEWAY=${KIND_GATEWAY:-198.19.0.1}
# The network's IPv6 subnet (the cluster is dual-stack), in the RFC 5180 benchmarking range; the
# docker host, the remote host, is its first address. Empty: IPv4 only (with an ipv4 cluster.yaml).
KIND_IPV6_SUBNET=${KIND_IPV6_SUBNET-2001:2:0:1::/64}
KIND_GATEWAY6=${KIND_GATEWAY6:-${KIND_IPV6_SUBNET:+${KIND_IPV6_SUBNET%%/*}1}}
REMOTE_NAME=${REMOTE_NAME:-remote.portslice.test}
UPLINK=eth0
IMAGES=$PORTSLICE_CACHE/images
KIND=$TOOLS_BIN/kind
KUBECTL=$K8S_BIN/kubectl
POD_SUBNET=$(sed -n 's/^ *podSubnet: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$KIND_CONFIG")
[ -n "$POD_SUBNET" ] || die "no podSubnet in $KIND_CONFIG"
# "IPv4[,IPv6]": one per family.
POD_SUBNET4=${POD_SUBNET%%,*}
POD_SUBNET6=$([[ $POD_SUBNET == *,* ]] && echo "${POD_SUBNET#*,}" || true)

k() { "$KUBECTL" --kubeconfig "$KIND_KUBECONFIG" "$@"; }
cluster_exists() { [ -x "$KIND" ] && docker version >/dev/null 2>&1 && "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; }
node_names() { docker ps -a --filter "label=io.x-k8s.kind.cluster=$CLUSTER" --format '{{.Names}}' | sort; }
node_ip() { docker inspect -f "{{(index .NetworkSettings.Networks \"$KIND_NETWORK\").IPAddress}}" "$1"; }

wait_for() { # DESCRIPTION TIMEOUT_S CMD...
    local what=$1 timeout=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${timeout}s waiting for $what"
        sleep 1
    done
}

# ---------------------------------------------------------------------------------------------
# up

network() {
    local subnets want="$KIND_SUBNET${KIND_IPV6_SUBNET:+ $KIND_IPV6_SUBNET}"
    if subnets=$(docker network inspect "$KIND_NETWORK" -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' 2>/dev/null); then
        [ "${subnets% }" = "$want" ] ||
            die "docker network '$KIND_NETWORK' exists with subnets '${subnets% }', not '$want' (kind.sh down, or docker network rm $KIND_NETWORK)"
        return 0
    fi
    local args=(-d bridge --subnet "$KIND_SUBNET" --gateway "$KIND_GATEWAY"
        -o com.docker.network.bridge.enable_ip_masquerade=false
        -o com.docker.network.driver.mtu=1500)
    [ -n "$KIND_IPV6_SUBNET" ] && args+=(--ipv6 --subnet "$KIND_IPV6_SUBNET" --gateway "$KIND_GATEWAY6")
    docker network create "${args[@]}" "$KIND_NETWORK" >/dev/null
    log "docker network $KIND_NETWORK: $want, gateway (the remote host) $KIND_GATEWAY"
}

create() {
    mkdir -p "$KIND_RUN"
    # kind bind-mounts /lib/modules; docker would create it on the host if it is missing.
    if [ ! -e /lib/modules ]; then
        mkdir -p /lib/modules
        touch "$KIND_RUN/created-lib-modules"
    fi
    if cluster_exists; then
        local running current
        current=$(docker inspect -f '{{.Config.Image}}' "$CLUSTER-control-plane" 2>/dev/null || true)
        [ "$current" = "$NODE_IMAGE" ] ||
            log "warning: cluster $CLUSTER runs $current, not the current $NODE_IMAGE (kind.sh down && kind.sh up to rebuild)"
        for running in $(node_names); do
            [ "$(docker inspect -f '{{.State.Running}}' "$running")" = true ] || docker start "$running" >/dev/null
        done
        [ -s "$KIND_KUBECONFIG" ] || "$KIND" export kubeconfig --name "$CLUSTER" --kubeconfig "$KIND_KUBECONFIG"
        log "cluster $CLUSTER exists"
        return 0
    fi
    local args=(create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --config "$KIND_CONFIG" --kubeconfig "$KIND_KUBECONFIG")
    [ "${KIND_RETAIN:-0}" = 1 ] && args+=(--retain)
    "$KIND" "${args[@]}" || die "kind create cluster failed (KIND_RETAIN=1 keeps the nodes for a look; kind export logs)"
}

node_table() { # "name podCIDR4 IP4 podCIDR6 IP6" a line ("-" for a family the node lacks); fails
    # until every node has its pod CIDRs
    local out name cidrs ips c4 c6 i4 i6 c i
    out=$(k get nodes -o jsonpath='{range .items[*]}{.metadata.name}|{.spec.podCIDRs[*]}|{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}') || return 1
    [ -n "$out" ] || return 1
    while IFS='|' read -r name cidrs ips; do
        c4=- c6=- i4=- i6=-
        for c in $cidrs; do if [[ $c == *:* ]]; then c6=$c; else c4=$c; fi; done
        for i in $ips; do if [[ $i == *:* ]]; then i6=$i; else i4=$i; fi; done
        [ "$c4" != - ] && [ "$i4" != - ] || return 1
        [ -z "$POD_SUBNET6" ] || { [ "$c6" != - ] && [ "$i6" != - ]; } || return 1
        echo "$name $c4 $i4 $c6 $i6"
    done <<<"$out"
}

kindnet_conflist() { # POD_CIDR4 POD_CIDR6|- MTU — kindnet's form, one host-local range per family
    local routes='{ "dst": "0.0.0.0/0" }' ranges="[ { \"subnet\": \"$1\" } ]"
    if [ "$2" != - ]; then
        routes+=', { "dst": "::/0" }'
        ranges+=", [ { \"subnet\": \"$2\" } ]"
    fi
    cat <<EOF
{
	"cniVersion": "0.3.1",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {
			"type": "host-local",
			"dataDir": "/run/cni-ipam-state",
			"routes": [
				$routes
			],
			"ranges": [
				$ranges
			]
		},
		"mtu": $3
	},
	{
		"type": "portmap",
		"capabilities": {
			"portMappings": true
		}
	}
	]
}
EOF
}

primary_cni() {
    wait_for "pod CIDRs on every node" 120 node_table
    local table name cidr ip cidr6 ip6 other ocidr oip ocidr6 oip6 mtu
    table=$(node_table)
    while read -r name cidr ip cidr6 ip6; do
        mtu=$(docker exec "$name" cat /sys/class/net/$UPLINK/mtu)
        # Written once: a chained plugin may add itself to this conflist afterwards.
        kindnet_conflist "$cidr" "$cidr6" "$mtu" | docker exec -i "$name" sh -euc '
            f=/etc/cni/net.d/10-kindnet.conflist
            [ -f "$f" ] && exit 0
            mkdir -p /etc/cni/net.d
            # containerd (1.6) reloads its CNI config on write, rename and remove events in this
            # directory but ignores create events: stage the file outside, move it in under a
            # name it never loads (create: ignored), then rename it (reload, with the whole file).
            cat > /etc/cni/10-kindnet.conflist.tmp
            mv /etc/cni/10-kindnet.conflist.tmp "$f.tmp"
            mv "$f.tmp" "$f"'
        while read -r other ocidr oip ocidr6 oip6; do
            [ "$other" = "$name" ] && continue
            docker exec "$name" ip route replace "$ocidr" via "$oip"
            [ "$ocidr6" = - ] || docker exec "$name" ip -6 route replace "$ocidr6" via "$oip6"
        done <<<"$table"
        docker exec "$name" sh -euc '
            c="kind-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom KIND-MASQ-AGENT chain"
            masq() { # iptables|ip6tables POD_SUBNET
                $1 -t nat -N KIND-MASQ-AGENT 2>/dev/null || true
                $1 -t nat -C POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment "$c" -j KIND-MASQ-AGENT 2>/dev/null ||
                    $1 -t nat -A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment "$c" -j KIND-MASQ-AGENT
                $1 -t nat -F KIND-MASQ-AGENT
                $1 -t nat -A KIND-MASQ-AGENT -d "$2" -m comment --comment "kind-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN
                $1 -t nat -A KIND-MASQ-AGENT -m comment --comment "kind-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE
            }
            masq iptables "$1"
            [ -z "$2" ] || masq ip6tables "$2"
        ' _ "$POD_SUBNET4" "$POD_SUBNET6"
        log "node $name ($ip ${ip6#-}): podCIDRs $cidr ${cidr6#-}, mtu $mtu"
    done <<<"$table"
}

nodes_ready() {
    k wait --for=condition=Ready nodes --all --timeout=180s >/dev/null ||
        die "not every node became Ready: $(k get nodes --no-headers 2>&1 | tr '\n' ';')"
}

# The kubernetes zone and the remote host's name, and nothing else: there is no `forward`, so no
# pod query leaves for the machine's resolver.
cluster_dns() {
    local corefile current
    corefile=$(cat <<EOF
.:53 {
    errors
    health {
        lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    hosts /etc/hosts ${REMOTE_NAME#*.} {
        $KIND_GATEWAY $REMOTE_NAME${KIND_GATEWAY6:+
        $KIND_GATEWAY6 $REMOTE_NAME}
    }
    prometheus :9153
    cache 30
    loadbalance
}
EOF
)
    current=$(k -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}')
    if [ "$current" != "$corefile" ]; then
        k -n kube-system create configmap coredns --from-literal=Corefile="$corefile" --dry-run=client -o yaml |
            k replace -f - >/dev/null
        k -n kube-system rollout restart deployment/coredns >/dev/null
        log "CoreDNS Corefile replaced: answers $REMOTE_NAME = $KIND_GATEWAY"
    fi
    k -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null ||
        die "CoreDNS did not become Ready: $(k -n kube-system get pods -l k8s-app=kube-dns --no-headers 2>&1 | tr '\n' ';')"
}

# What the cluster was created from: its config and the network's subnets. A cluster (or network)
# of another config is deleted and recreated by `up` instead of being reused half-fitting.
STAMP=$PORTSLICE_CACHE/kind-$CLUSTER.stamp
config_stamp() { printf '%s %s %s\n' "$(sha256sum "$KIND_CONFIG" | cut -c1-16)" "$KIND_SUBNET" "$KIND_IPV6_SUBNET"; }

stale_cluster() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(config_stamp)" ] && return 0
    if cluster_exists; then
        log "cluster $CLUSTER was made from another config (or before stamps): recreating it"
        "$KIND" delete cluster --name "$CLUSTER" --kubeconfig "$KIND_KUBECONFIG"
    fi
    local left; left=$(node_names)
    [ -z "$left" ] || docker rm -f -v $left >/dev/null
    if docker network inspect "$KIND_NETWORK" >/dev/null 2>&1; then
        docker network rm "$KIND_NETWORK" >/dev/null
    fi
    rm -f "$STAMP"
}

node_image() {
    NODE_IMAGE=$(bash e2e/scripts/kind-image.sh) || die "building kind or the node image failed (output above)"
    [ -n "$NODE_IMAGE" ] || die "kind-image.sh printed no image name"
}

up() {
    local total=$SECONDS
    stage docker bash e2e/scripts/docker.sh up
    stage node-image node_image
    stage kind-config stale_cluster
    stage kind-network network
    stage kind-create create
    config_stamp > "$STAMP"
    stage primary-cni primary_cni
    stage nodes-ready nodes_ready
    stage cluster-dns cluster_dns
    log "kind cluster $CLUSTER up in $((SECONDS - total))s"
    env_out >&2
}

# ---------------------------------------------------------------------------------------------

env_out() {
    cluster_exists || die "no kind cluster $CLUSTER (kind.sh up)"
    local nodes="" name
    for name in $(node_names); do nodes+="$name=$(node_ip "$name") "; done
    q() { printf 'export %s=%q\n' "$1" "$2"; }
    q KUBECONFIG "$KIND_KUBECONFIG"
    q PORTSLICE_CACHE "$PORTSLICE_CACHE"
    # kind, helm (built here) and kubectl (the pinned build) first on PATH.
    q PATH "$TOOLS_BIN:$K8S_BIN:$PATH"
    q KIND_CLUSTER "$CLUSTER"
    q KIND_NODES "${nodes% }"
    # The e2e suite's view: every node through `docker exec`, the docker host as the remote.
    q PORTSLICE_E2E_NODE_EXEC "docker exec {node}"
    q PORTSLICE_E2E_REMOTE_IP "$KIND_GATEWAY"
    q PORTSLICE_E2E_REMOTE_IP6 "${KIND_GATEWAY6:-}"
    q PORTSLICE_E2E_REMOTE_EXEC ""
    q PORTSLICE_E2E_REMOTE_NAME "$REMOTE_NAME"
    q PORTSLICE_E2E_HELM "$TOOLS_BIN/helm"
    q PORTSLICE_E2E_KUBECTL "$KUBECTL"
}

load() {
    cluster_exists || die "no kind cluster $CLUSTER (kind.sh up)"
    local tars=("$@") t
    [ ${#tars[@]} -eq 0 ] && tars=("$IMAGES/portslice-operator.tar" "$IMAGES/portslice-node.tar" "$IMAGES/portslice-e2e-agent.tar" "$IMAGES/portslice-coturn.tar")
    for t in "${tars[@]}"; do
        if [ ! -f "$t" ]; then log "skipping $t (not built: e2e/scripts/images.sh --no-import)"; continue; fi
        stage "load-$(basename "$t" .tar)" "$KIND" load image-archive "$t" --name "$CLUSTER"
    done
}

down() {
    local total=$SECONDS
    # A dockerd that is not running may still hold the cluster's stopped nodes in its data-root.
    if ! docker version >/dev/null 2>&1 && [ -n "$(ls -A "$PORTSLICE_CACHE/docker/containers" 2>/dev/null)" ]; then
        bash e2e/scripts/docker.sh up
    fi
    if docker version >/dev/null 2>&1; then
        if cluster_exists; then
            stage kind-delete "$KIND" delete cluster --name "$CLUSTER" --kubeconfig "$KIND_KUBECONFIG"
        fi
        local left; left=$(node_names)
        [ -z "$left" ] || docker rm -f -v $left >/dev/null
        docker network inspect "$KIND_NETWORK" >/dev/null 2>&1 && docker network rm "$KIND_NETWORK" >/dev/null
    fi
    if [ -f "$KIND_RUN/created-lib-modules" ]; then rmdir /lib/modules 2>/dev/null || true; fi
    rm -rf "$KIND_RUN" "$STAMP"
    bash e2e/scripts/docker.sh down
    log "kind down in $((SECONDS - total))s"
}

status() {
    bash e2e/scripts/docker.sh status || return 1
    cluster_exists || { echo "kind cluster $CLUSTER: absent"; return 1; }
    echo "kind cluster $CLUSTER:"
    k get nodes -o wide
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) env_out ;;
    load) shift; load "$@" ;;
    status) status ;;
    *) die "usage: $0 up|down|env|load [TAR...]|status" ;;
esac
