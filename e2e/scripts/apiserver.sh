#!/usr/bin/env bash
# Runs a real kube-apiserver + etcd on loopback for tests and benchmarks (no kubelet, no
# controllers): the smallest control plane the operator can be tested against.
#
# usage: apiserver.sh start DIR    # writes DIR/kubeconfig (admin), DIR/ca.{crt,key}, logs, pids
#        apiserver.sh stop DIR     # kills both and removes their state (logs are kept)
#
# Ports are picked free at random, so several runs can share the machine. Knobs for the local
# single-node cluster script, which reuses this one:
#   APISERVER_ADVERTISE_ADDRESS (127.0.0.1)  address in the kubernetes Service endpoints
#   APISERVER_BIND_ADDRESS      (127.0.0.1)  address the secure port listens on
#   APISERVER_SECURE_PORT       (random)     secure port
#   SERVICE_CLUSTER_IP_RANGE    (10.0.0.0/24)
#   APISERVER_EXTRA_ARGS        ("")         appended to the kube-apiserver command line
#   ETCD_BIN                    (etcd)       etcd binary (Debian's etcd-server 3.4 works with 1.34)
source "$(dirname "$0")/lib.sh"

ADVERTISE=${APISERVER_ADVERTISE_ADDRESS:-127.0.0.1}
BIND=${APISERVER_BIND_ADDRESS:-127.0.0.1}
SVC_RANGE=${SERVICE_CLUSTER_IP_RANGE:-10.0.0.0/24}
ETCD_BIN=${ETCD_BIN:-etcd}
# Where clients (kubeconfig, readiness probe) reach the secure port.
case "$BIND" in 0.0.0.0|::|"") CLIENT_HOST=127.0.0.1 ;; *) CLIENT_HOST=$BIND ;; esac

# A random port in 20000-29999: below the NodePort range and the kernel's ephemeral range, so a
# client socket never steals it between the check and the bind. Retried on collision by the caller.
free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 10000))
        if ! ss -Hltn "sport = :$p" | grep -q .; then echo "$p"; return 0; fi
    done
    die "no free port found"
}

# The first address of the service range (the `kubernetes` Service's ClusterIP) goes into the
# serving certificate, so in-cluster clients can verify the API server.
first_service_ip() {
    python3 -c "import ipaddress,sys; print(next(ipaddress.ip_network(sys.argv[1]).hosts()))" "$1"
}

gen_certs() {
    local d=$1 svc_ip
    svc_ip=$(first_service_ip "$SVC_RANGE")
    mkdir -p "$d/pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=portslice-test-ca" \
        -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
    cat > "$d/pki/serving.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$ADVERTISE,IP:$CLIENT_HOST,IP:$svc_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
        -keyout "$d/pki/serving.key" -out "$d/pki/serving.csr" 2>/dev/null
    openssl x509 -req -in "$d/pki/serving.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 3650 -extfile "$d/pki/serving.ext" -out "$d/pki/serving.crt" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
        > "$d/pki/client.ext"
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" \
        -keyout "$d/pki/admin.key" -out "$d/pki/admin.csr" 2>/dev/null
    openssl x509 -req -in "$d/pki/admin.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 3650 -extfile "$d/pki/client.ext" -out "$d/pki/admin.crt" 2>/dev/null
    openssl genrsa -out "$d/pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/pki/sa.key" -pubout -out "$d/pki/sa.pub" 2>/dev/null
}

write_kubeconfig() {
    local d=$1 port=$2
    cat > "$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: portslice-test
  cluster:
    server: https://$CLIENT_HOST:$port
    certificate-authority-data: $(base64 -w0 < "$d/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 < "$d/pki/admin.crt")
    client-key-data: $(base64 -w0 < "$d/pki/admin.key")
contexts:
- name: portslice-test
  context: {cluster: portslice-test, user: admin}
current-context: portslice-test
EOF
}

# Waits until $1 answers ok, or the process in pid file $2 dies, or $3 seconds pass.
wait_ok() {
    local probe=$1 pidfile=$2 timeout=$3 start=$SECONDS
    while ! eval "$probe" >/dev/null 2>&1; do
        kill -0 "$(cat "$pidfile")" 2>/dev/null || return 1
        [ $((SECONDS - start)) -lt "$timeout" ] || return 1
        sleep 0.2
    done
}

start_etcd() {
    local d=$1
    for _ in 1 2 3; do
        local cport pport
        cport=$(free_port); pport=$(free_port)
        rm -rf "$d/etcd-data"
        "$ETCD_BIN" --name portslice-test --data-dir "$d/etcd-data" \
            --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
            --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
            --initial-cluster "portslice-test=http://127.0.0.1:$pport" \
            --unsafe-no-fsync --quota-backend-bytes=8589934592 --log-level warn \
            >"$d/etcd.log" 2>&1 &
        echo $! > "$d/etcd.pid"
        if wait_ok "curl -sf http://127.0.0.1:$cport/health" "$d/etcd.pid" 30; then
            echo "http://127.0.0.1:$cport" > "$d/etcd.url"
            return 0
        fi
        log "etcd did not start on port $cport; retrying"; kill "$(cat "$d/etcd.pid")" 2>/dev/null || true
    done
    tail -20 "$d/etcd.log" >&2
    die "etcd failed to start (log: $d/etcd.log)"
}

start_apiserver() {
    local d=$1 etcd_url
    etcd_url=$(cat "$d/etcd.url")
    local extra=()
    # The `kubernetes` Endpoints object refuses loopback addresses; with nothing in-cluster to
    # reach us there is no point in reconciling it (envtest does the same).
    case "$ADVERTISE" in 127.*) extra+=(--endpoint-reconciler-type=none) ;; esac
    for _ in 1 2 3; do
        local port=${APISERVER_SECURE_PORT:-$(free_port)}
        # shellcheck disable=SC2086 # APISERVER_EXTRA_ARGS is a list of flags
        "$K8S_BIN/kube-apiserver" \
            --etcd-servers="$etcd_url" \
            --bind-address="$BIND" --advertise-address="$ADVERTISE" --secure-port="$port" \
            --cert-dir="$d/pki" --tls-cert-file="$d/pki/serving.crt" --tls-private-key-file="$d/pki/serving.key" \
            --client-ca-file="$d/ca.crt" \
            --service-account-issuer=https://kubernetes.default.svc.cluster.local \
            --service-account-key-file="$d/pki/sa.pub" --service-account-signing-key-file="$d/pki/sa.key" \
            --service-cluster-ip-range="$SVC_RANGE" \
            --authorization-mode=Node,RBAC --allow-privileged=true \
            --enable-priority-and-fairness=false --max-requests-inflight=2000 --max-mutating-requests-inflight=1000 \
            --profiling=false --v=1 "${extra[@]}" ${APISERVER_EXTRA_ARGS:-} \
            >"$d/apiserver.log" 2>&1 &
        echo $! > "$d/apiserver.pid"
        write_kubeconfig "$d" "$port"
        if wait_ok "curl -sf --cacert $d/ca.crt --cert $d/pki/admin.crt --key $d/pki/admin.key https://$CLIENT_HOST:$port/readyz" \
            "$d/apiserver.pid" 120; then
            return 0
        fi
        kill "$(cat "$d/apiserver.pid")" 2>/dev/null || true
        # A taken port shows as "address already in use"; anything else is a real failure.
        grep -q "address already in use" "$d/apiserver.log" && [ -z "${APISERVER_SECURE_PORT:-}" ] || break
        log "kube-apiserver port $port was taken; retrying"
    done
    tail -30 "$d/apiserver.log" >&2
    die "kube-apiserver failed to become ready (log: $d/apiserver.log)"
}

cmd_start() {
    local d=$1
    mkdir -p "$d"
    d=$(cd "$d" && pwd)
    stage "install etcd, openssl" apt_install etcd-server openssl curl python3 iproute2
    stage "build kube-apiserver" bash "$(dirname "$0")/build-k8s.sh" kube-apiserver
    stage "generate certificates" gen_certs "$d"
    stage "start etcd" start_etcd "$d"
    stage "start kube-apiserver" start_apiserver "$d"
    log "kube-apiserver ready: KUBECONFIG=$d/kubeconfig"
}

cmd_stop() {
    local d=$1 pid
    [ -d "$d" ] || return 0
    for name in apiserver etcd; do
        [ -f "$d/$name.pid" ] || continue
        pid=$(cat "$d/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$d/$name.pid"
    done
    rm -rf "$d/etcd-data" "$d/pki" "$d/kubeconfig" "$d/ca.key" "$d/etcd.url"
}

case "${1:-}" in
    start) [ $# -eq 2 ] || die "usage: $0 start DIR"; cmd_start "$2" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; cmd_stop "$2" ;;
    *) die "usage: $0 start DIR | stop DIR" ;;
esac
