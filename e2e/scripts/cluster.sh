#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, without systemd or Docker:
# etcd (Debian), kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy
# (built from the pinned Kubernetes Go modules), containerd + runc (Debian), Debian's reference CNI
# plugins as the primary CNI (ptp + host-local + portmap), locally built pause/busybox/CoreDNS
# images, and a "remote host" network namespace on the node's uplink.
#
# usage: cluster.sh up|down|status|env
#   up      idempotent: a running cluster is left alone
#   down    stops everything this script started and removes its state, netns, veths and chains
#   status  prints what runs
#   env     prints KUBECONFIG and the addresses, for `eval`
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/cluster-env.sh"
source "$(dirname "$0")/oci.sh"

PKI=$E2E_STATE/pki
LOGS=$E2E_STATE/logs
PIDS=$E2E_RUN/pids
IMAGES=$PORTSLICE_CACHE/images
KUBECTL=$K8S_BIN/kubectl

# ---------------------------------------------------------------------------------------------
# processes: each component runs in its own session; its pid file is how `down` finds it.

start_proc() { # NAME CMD...
    local name=$1; shift
    if proc_running "$name"; then return 0; fi
    mkdir -p "$PIDS" "$LOGS"
    setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$PIDS/$name.pid"
}

proc_running() {
    local pid
    [ -f "$PIDS/$1.pid" ] || return 1
    pid=$(cat "$PIDS/$1.pid")
    kill -0 "$pid" 2>/dev/null
}

stop_proc() {
    local name=$1 pid i
    [ -f "$PIDS/$name.pid" ] || return 0
    pid=$(cat "$PIDS/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$name.pid"
}

# kube-proxy exits when its config file changes, so a rerun of `up` must not touch unchanged files.
write_if_changed() { # FILE < content
    local tmp="$1.new"
    cat > "$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

wait_for() { # DESCRIPTION TIMEOUT_S CMD...
    local what=$1 timeout=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${timeout}s waiting for $what (logs: $LOGS)"
        sleep 0.5
    done
}

# ---------------------------------------------------------------------------------------------
# stages of `up`

prereqs() {
    apt_install etcd-server containerd runc containernetworking-plugins busybox-static iptables \
        conntrack iproute2 openssl gcc libc6-dev kmod
    local missing=() b
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        [ -x "$K8S_BIN/$b" ] || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] || bash "$REPO_ROOT/e2e/scripts/build-k8s.sh" "${missing[@]}"
    build_go_tool crictl "sigs.k8s.io/cri-tools/cmd/crictl@v$CRICTL_VERSION"
    build_go_tool coredns "github.com/coredns/coredns@v$COREDNS_VERSION"
}

build_go_tool() { # NAME MODULE@VERSION — cached in $TOOLS_BIN
    [ -x "$TOOLS_BIN/$1" ] && return 0
    log "building $1 from $2"
    mkdir -p "$TOOLS_BIN"
    GOBIN="$TOOLS_BIN" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$2"
}

network() {
    modprobe br_netfilter 2>/dev/null || true
    # The node DaemonSet mounts bpffs with Bidirectional propagation, which needs a shared mount.
    ensure_bpffs
    mount --make-shared /sys/fs/bpf
    sysctl -qw net.ipv4.ip_forward=1
    if ! ip netns list | grep -qw "$REMOTE_NETNS"; then
        ip netns add "$REMOTE_NETNS"
    fi
    if ! ip link show "$UPLINK" >/dev/null 2>&1; then
        ip link add "$UPLINK" type veth peer name eth0 netns "$REMOTE_NETNS"
        ip addr add "$NODE_IP/$UPLINK_PREFIX" dev "$UPLINK"
        ip link set "$UPLINK" up
        ip -n "$REMOTE_NETNS" addr add "$REMOTE_IP/$UPLINK_PREFIX" dev eth0
        ip -n "$REMOTE_NETNS" link set eth0 up
        ip -n "$REMOTE_NETNS" link set lo up
    fi
}

# A CA and one client certificate per component, so RBAC and the Node authorizer see the same
# identities as on a kubeadm cluster.
pki() {
    [ -f "$PKI/done" ] && return 0
    mkdir -p "$PKI"
    (
        cd "$PKI"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
        openssl req -x509 -new -key ca.key -subj "/CN=portslice-e2e-ca" -days 3650 -out ca.crt 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        cert apiserver "/CN=kube-apiserver" serverAuth \
            "IP:$NODE_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
        cert admin "/O=system:masters/CN=kubernetes-admin" clientAuth
        cert controller-manager "/CN=system:kube-controller-manager" clientAuth
        cert scheduler "/CN=system:kube-scheduler" clientAuth
        cert kube-proxy "/CN=system:kube-proxy" clientAuth
        cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
    )
    local c
    for c in admin controller-manager scheduler kube-proxy kubelet; do
        kubeconfig "$c" > "$PKI/$c.kubeconfig"
    done
    touch "$PKI/done"
}

cert() { # NAME SUBJECT USAGE [SANS]
    local name=$1 subj=$2 usage=$3 sans=${4:-}
    openssl ecparam -name prime256v1 -genkey -noout -out "$name.key" 2>/dev/null
    openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$usage"
        [ -n "$sans" ] && echo "subjectAltName=$sans"
    } > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}

kubeconfig() { # NAME
    cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: portslice-e2e
  cluster:
    server: https://$NODE_IP:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $1
  user:
    client-certificate: $PKI/$1.crt
    client-key: $PKI/$1.key
contexts:
- name: portslice-e2e
  context: {cluster: portslice-e2e, user: $1}
current-context: portslice-e2e
EOF
}

etcd_up() {
    start_proc etcd etcd --name portslice-e2e --data-dir "$E2E_STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "portslice-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
        --unsafe-no-fsync
    wait_for etcd 60 curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"
}

apiserver_up() {
    start_proc kube-apiserver "$K8S_BIN/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --advertise-address "$NODE_IP" --bind-address "$NODE_IP" --secure-port "$APISERVER_PORT" \
        --service-cluster-ip-range "$SERVICE_CIDR" \
        --client-ca-file "$PKI/ca.crt" \
        --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types InternalIP \
        --service-account-key-file "$PKI/sa.pub" \
        --service-account-signing-key-file "$PKI/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
        --allow-privileged=true --profiling=false --endpoint-reconciler-type lease
    wait_for kube-apiserver 120 "$KUBECTL" --kubeconfig "$E2E_KUBECONFIG" get --raw /readyz
}

controllers_up() {
    start_proc kube-controller-manager "$K8S_BIN/kube-controller-manager" \
        --kubeconfig "$PKI/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$PKI/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$PKI/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false \
        --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
        --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
        --use-service-account-credentials=true \
        --allocate-node-cidrs=true --cluster-cidr "$CLUSTER_CIDR" --node-cidr-mask-size 24 \
        --service-cluster-ip-range "$SERVICE_CIDR"
    start_proc kube-scheduler "$K8S_BIN/kube-scheduler" \
        --kubeconfig "$PKI/scheduler.kubeconfig" \
        --authentication-kubeconfig "$PKI/scheduler.kubeconfig" \
        --authorization-kubeconfig "$PKI/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --leader-elect=false
}

# containerd 1.6 (Debian): cgroupfs (no systemd here), our pause image as the sandbox image, and
# only the first conflist in /etc/cni/net.d (max_conf_num 1) — a chained plugin such as
# PortSlice's must therefore go into that conflist.
containerd_up() {
    mkdir -p "$E2E_STATE/containerd" "$E2E_RUN" "$CNI_BIN_DIR" "$CNI_CONF_DIR"
    # containerd 1.6 takes one CNI bin dir: Debian's plugins are linked into it.
    local p
    for p in /usr/lib/cni/*; do ln -sfn "$p" "$CNI_BIN_DIR/$(basename "$p")"; done
    write_if_changed "$E2E_STATE/containerd/config.toml" <<EOF
version = 2
root = "$E2E_STATE/containerd/root"
state = "$E2E_RUN/containerd"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This machine withholds CAP_SYS_RESOURCE, so no process may lower its oom_score_adj: clamp
  # the kubelet's negative scores instead of failing every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$E2E_RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$CNI_CONF_DIR"
    max_conf_num = 1
EOF
    start_proc containerd containerd --config "$E2E_STATE/containerd/config.toml"
    wait_for containerd 60 ctr --address "$CONTAINERD_SOCK" version
}

# Debian's reference plugins as the primary CNI, at cniVersion 1.0.0.
primary_cni() {
    [ -f "$CNI_CONFLIST" ] && return 0
    cat > "$CNI_CONFLIST" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "portslice-e2e",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": true,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$E2E_STATE/cni-ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# pause (static C), busybox (Debian's busybox-static) and CoreDNS images, built here and imported.
base_images() {
    mkdir -p "$IMAGES"
    local root
    if [ ! -f "$IMAGES/pause.tar" ]; then
        root=$(mktemp -d)
        gcc -static -Os -o "$root/pause" "$REPO_ROOT/e2e/images/pause/pause.c"
        strip "$root/pause"
        oci_pack "$PAUSE_IMAGE" "$root" "$IMAGES/pause.tar" '["/pause"]'
        rm -rf "$root"
    fi
    if [ ! -f "$IMAGES/busybox.tar" ]; then
        root=$(mktemp -d)
        mkdir -p "$root/bin" "$root/tmp" "$root/etc"
        cp /bin/busybox "$root/bin/busybox"
        local applet
        for applet in sh nc httpd nslookup sleep echo cat ip ping wget hostname ls ps kill true; do
            ln -s busybox "$root/bin/$applet"
        done
        echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
        echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >> "$root/etc/passwd"
        oci_pack "$BUSYBOX_IMAGE" "$root" "$IMAGES/busybox.tar" '["/bin/sh"]' '["PATH=/bin"]'
        rm -rf "$root"
    fi
    if [ ! -f "$IMAGES/coredns.tar" ]; then
        root=$(mktemp -d)
        cp "$TOOLS_BIN/coredns" "$root/coredns"
        oci_pack "$COREDNS_IMAGE" "$root" "$IMAGES/coredns.tar" '["/coredns"]'
        rm -rf "$root"
    fi
    local t
    for t in pause busybox coredns; do oci_import "$IMAGES/$t.tar"; done
}

kubelet_up() {
    mkdir -p "$E2E_STATE/kubelet"
    write_if_changed "$E2E_STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
# cgroup v1 machine; Kubernetes 1.35+ would refuse it.
failCgroupV1: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$CLUSTER_DNS_IP]
address: $NODE_IP
readOnlyPort: 0
failSwapOn: false
# Images come from local tars, not a registry: never garbage-collect them.
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
serializeImagePulls: false
EOF
    start_proc kubelet "$K8S_BIN/kubelet" --config "$E2E_STATE/kubelet/config.yaml" \
        --kubeconfig "$PKI/kubelet.kubeconfig" --hostname-override "$NODE_NAME" \
        --node-ip "$NODE_IP" --root-dir /var/lib/kubelet --oom-score-adj 0
    wait_for "node $NODE_NAME Ready" 180 node_ready
}

node_ready() {
    [ "$(kubectl_e2e get node "$NODE_NAME" \
        -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

kube_proxy_up() {
    mkdir -p "$E2E_STATE/kube-proxy"
    write_if_changed "$E2E_STATE/kube-proxy/config.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $PKI/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0}
oomScoreAdj: 0
EOF
    start_proc kube-proxy "$K8S_BIN/kube-proxy" --config "$E2E_STATE/kube-proxy/config.yaml"
    wait_for kube-proxy 60 curl -fsS http://127.0.0.1:10256/healthz
}

# CoreDNS answers cluster.local and the remote host's zone and nothing else: there is no
# `forward`, so no pod query ever leaves for the machine's real resolver. (`hosts` runs before
# `kubernetes` in CoreDNS' plugin chain, so it is limited to its own zone.)
dns_up() {
    local corefile
    corefile=$(cat <<EOF
.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    hosts /etc/hosts ${REMOTE_NAME#*.} {
        $REMOTE_IP $REMOTE_NAME
    }
    cache 30
}
EOF
)
    kubectl_e2e apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- {apiGroups: [""], resources: [endpoints, services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
$(sed 's/^/    /' <<<"$corefile")
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata:
      labels: {k8s-app: kube-dns}
      # A changed Corefile rolls the pods (CoreDNS reads it once).
      annotations: {portslice.io/corefile-sha256: "$(sha256sum <<<"$corefile" | cut -c1-16)"}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      tolerations: [{operator: Exists}]
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: Never
        args: ["-conf", "/etc/coredns/Corefile"]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        readinessProbe: {httpGet: {path: /ready, port: 8181}, periodSeconds: 2}
        livenessProbe: {httpGet: {path: /health, port: 8080}}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
        resources: {requests: {cpu: 50m, memory: 64Mi}}
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $CLUSTER_DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
    kubectl_e2e -n kube-system rollout status deploy/coredns --timeout=180s >/dev/null
}

# A throwaway busybox pod must reach Running with an address from the ptp range, and resolve
# kubernetes.default through the cluster DNS.
smoke() {
    local pod=smoke-$$
    kubectl_e2e -n default run "$pod" --image "$BUSYBOX_IMAGE" --image-pull-policy Never \
        --restart Never --command -- sleep 300 >/dev/null
    kubectl_e2e -n default wait --for=condition=Ready "pod/$pod" --timeout=120s >/dev/null
    local ip; ip=$(kubectl_e2e -n default get pod "$pod" -o jsonpath='{.status.podIP}')
    case $ip in 10.244.*) ;; *) die "smoke pod has address '$ip', not from $POD_CIDR" ;; esac
    kubectl_e2e -n default exec "$pod" -- nslookup kubernetes.default.svc.cluster.local "$CLUSTER_DNS_IP" >/dev/null ||
        die "smoke pod cannot resolve kubernetes.default through $CLUSTER_DNS_IP"
    kubectl_e2e -n default delete pod "$pod" --grace-period=0 --force >/dev/null 2>&1 || true
    log "smoke pod ran at $ip and resolved kubernetes.default"
}

up() {
    if [ -f "$E2E_STATE/up" ] && status >/dev/null 2>&1; then
        log "cluster already up (KUBECONFIG=$E2E_KUBECONFIG)"
        return 0
    fi
    local total=$SECONDS
    stage prereqs prereqs
    stage network network
    stage pki pki
    stage etcd etcd_up
    stage kube-apiserver apiserver_up
    stage controllers controllers_up
    stage containerd containerd_up
    stage primary-cni primary_cni
    stage base-images base_images
    stage kubelet kubelet_up
    stage kube-proxy kube_proxy_up
    stage cluster-dns dns_up
    stage smoke smoke
    touch "$E2E_STATE/up"
    log "cluster up in $((SECONDS - total))s: node $NODE_NAME at $NODE_IP, remote netns $REMOTE_NETNS at $REMOTE_IP"
    log "export KUBECONFIG=$E2E_KUBECONFIG"
}

# ---------------------------------------------------------------------------------------------
# down: collect failures and carry on, so one stuck piece never leaves the rest behind.

down() {
    local total=$SECONDS
    # No controller may recreate pods while the node is being drained.
    stop_proc kube-controller-manager
    stop_proc kube-scheduler
    stop_proc kubelet
    if [ -S "$CONTAINERD_SOCK" ] && [ -x "$TOOLS_BIN/crictl" ]; then
        # Stopping the sandboxes through CRI runs CNI DEL for each: veths, IPAM and chains go.
        crictl_e2e rmp -fa >/dev/null 2>&1 || log "warning: crictl rmp -fa failed"
    fi
    # A chart still installed (down without helm uninstall): undo what its node daemon did.
    if [ -x "$CNI_BIN_DIR/portslice" ]; then
        "$CNI_BIN_DIR/portslice" daemon --uninstall --uplink "$UPLINK" --node-ip "$NODE_IP" \
            --cni-bin-dir "$CNI_BIN_DIR" --cni-conf-dir "$CNI_CONF_DIR" \
            --kubeconfig-out "$CNI_CONF_DIR/portslice.kubeconfig" >/dev/null 2>&1 ||
            log "warning: portslice daemon --uninstall failed"
    fi
    stop_proc kube-proxy
    [ -x "$K8S_BIN/kube-proxy" ] && "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
    delete_kube_chains
    stop_proc containerd
    kill_leftover_shims
    stop_proc kube-apiserver
    stop_proc etcd
    umount_under /var/lib/kubelet
    umount_under "$E2E_STATE"
    umount_under "$E2E_RUN"
    rm -rf /var/lib/kubelet "$E2E_STATE" "$E2E_RUN"
    remove_cgroups kubepods
    rm -f "$CNI_CONFLIST" "$CNI_CONF_DIR/.portslice"*
    ip link del "$UPLINK" 2>/dev/null || true
    ip netns del "$REMOTE_NETNS" 2>/dev/null || true
    log "cluster down in $((SECONDS - total))s"
}

crictl_e2e() { "$TOOLS_BIN/crictl" --runtime-endpoint "unix://$CONTAINERD_SOCK" --timeout 60s "$@"; }

# Shims outlive containerd by design; ours are found by the containerd socket in their command line.
kill_leftover_shims() {
    local pid
    for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" || true); do
        kill -KILL "$pid" 2>/dev/null || true
    done
}

umount_under() {
    local m
    [ -d "$1" ] || return 0
    for m in $(awk -v p="$1" '$2 ~ "^"p {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}

# The kubelet's cgroup tree (cgroupfs driver) outlives it; empty directories are all that is left.
remove_cgroups() {
    local d
    for d in /sys/fs/cgroup/*/"$1"; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    return 0
}

# kube-proxy --cleanup takes its own rules; the kubelet's canary and hint chains stay behind.
delete_kube_chains() {
    local table chain rule
    for table in filter nat mangle; do
        # Flush our chains, drop the jumps into them from the built-in chains, then delete them.
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
            iptables -t "$table" -F "$chain" 2>/dev/null || true
        done
        { iptables -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' || true; } | sed 's/^-A //' |
            while read -r rule; do eval "iptables -t $table -D $rule" 2>/dev/null || true; done
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
            iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

status() {
    local name ok=0
    for name in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy; do
        if proc_running "$name"; then echo "$name: running (pid $(cat "$PIDS/$name.pid"))"
        else echo "$name: stopped"; ok=1; fi
    done
    if [ $ok -eq 0 ]; then
        node_ready && echo "node $NODE_NAME: Ready" || { echo "node $NODE_NAME: not Ready"; ok=1; }
    fi
    return $ok
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export KUBECONFIG=$E2E_KUBECONFIG NODE_IP=$NODE_IP REMOTE_NETNS=$REMOTE_NETNS REMOTE_IP=$REMOTE_IP" ;;
    *) die "usage: $0 up|down|status|env" ;;
esac
