#!/usr/bin/env bash
# Docker on this machine, without systemd: Debian's docker.io, dockerd started by hand with its
# images in the cache (they survive `down`) and its run state under /run, on the default socket
# /var/run/docker.sock so `docker` and `kind` just work. Used by kind.sh.
#
# What this machine needs from dockerd, and why:
#   - runtime: e2e/kind/runc-wrapper (copied into the run dir) as the default runtime, because the
#     capability bounding set here lacks CAP_SYS_RESOURCE and `docker run --privileged` would fail;
#   - addresses: no docker0 (--bridge=none) and every network docker allocates inside
#     198.18.0.0/15 (the benchmarking range, local to this machine): pools from 198.19.128.0/17;
#     kind.sh creates the `kind` network itself (198.19.0.0/24); the datapath tests use
#     198.18.0.0/24 inside their own namespaces;
#   - cgroupfs (no systemd), overlay2, oom-score-adjust 0 (lowering it needs CAP_SYS_RESOURCE).
# `up` records what dockerd changes on the host (FORWARD policy, ip_forward, bridge-nf-call-*,
# interfaces, directories) and `down` puts it back: docker's chains and rules, its bridges and
# veths and what it mounted go, dockerd stops.
#
# usage: docker.sh up|down|status
source "$(dirname "$0")/lib.sh"

DOCKER_RUN=${DOCKER_RUN:-/run/portslice-docker}
DOCKER_DATA=${DOCKER_DATA:-$PORTSLICE_CACHE/docker}
DOCKER_SOCK=/var/run/docker.sock
PIDFILE=$DOCKER_RUN/dockerd.pid
STATE=$DOCKER_RUN/host-state
LOG=$DOCKER_RUN/dockerd.log
# Docker's own subnets (networks created without --subnet): inside 198.18.0.0/15, clear of the
# local cluster (198.18.0.0/24), the kind network (198.19.0.0/24) and room for more by hand.
DOCKER_POOL=${DOCKER_POOL:-198.19.128.0/17}

dockerd_pid() { [ -f "$PIDFILE" ] && cat "$PIDFILE"; }
dockerd_running() { local pid; pid=$(dockerd_pid) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
docker_ok() { docker version >/dev/null 2>&1; }

sysctl_get() { [ -e "/proc/sys/$1" ] && cat "/proc/sys/$1" || echo absent; }
sysctl_put() { [ "$2" = absent ] || [ ! -e "/proc/sys/$1" ] || echo "$2" > "/proc/sys/$1"; }

# Written once, before the first dockerd start; a stale file from a crashed run is the original.
record_host_state() {
    [ -f "$STATE" ] && return 0
    mkdir -p "$DOCKER_RUN"
    local policy=ACCEPT
    if command -v iptables >/dev/null; then
        policy=$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')
    fi
    {
        echo "forward_policy=${policy:-ACCEPT}"
        echo "ip_forward=$(sysctl_get net/ipv4/ip_forward)"
        # An IPv6 network (kind.sh KIND_IPV6_SUBNET) makes dockerd turn on IPv6 forwarding.
        echo "ip6_forward_all=$(sysctl_get net/ipv6/conf/all/forwarding)"
        echo "ip6_forward_default=$(sysctl_get net/ipv6/conf/default/forwarding)"
        echo "bridge_nf_iptables=$(sysctl_get net/bridge/bridge-nf-call-iptables)"
        echo "bridge_nf_ip6tables=$(sysctl_get net/bridge/bridge-nf-call-ip6tables)"
        echo "links='$(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | tr '\n' ' ')'"
        # /etc/docker is docker.io's; dockerd adds key.json (its libtrust key) to it.
        echo "had_key_json=$([ -e /etc/docker/key.json ] && echo 1 || echo 0)"
        echo "had_run_docker=$([ -e /run/docker ] && echo 1 || echo 0)"
    } > "$STATE.tmp"
    mv "$STATE.tmp" "$STATE"
}

install_packages() {
    # policy-rc.d (present on this image) keeps the package scripts from starting a dockerd of
    # their own; the machine's one is started below.
    apt_install docker.io containerd runc iptables jq
    command -v docker >/dev/null || die "no docker CLI after installing docker.io"
}

write_config() {
    mkdir -p "$DOCKER_RUN" "$DOCKER_DATA"
    install -m 0755 "$REPO_ROOT/e2e/kind/runc-wrapper" "$DOCKER_RUN/runc-wrapper"
    cat > "$DOCKER_RUN/daemon.json" <<EOF
{
  "data-root": "$DOCKER_DATA",
  "exec-root": "$DOCKER_RUN/exec",
  "pidfile": "$PIDFILE",
  "hosts": ["unix://$DOCKER_SOCK"],
  "bridge": "none",
  "default-address-pools": [{"base": "$DOCKER_POOL", "size": 24}],
  "storage-driver": "overlay2",
  "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "oom-score-adjust": 0,
  "runtimes": {"portslice-runc": {"path": "$DOCKER_RUN/runc-wrapper"}},
  "default-runtime": "portslice-runc",
  "log-driver": "json-file",
  "log-opts": {"max-size": "20m", "max-file": "2"}
}
EOF
}

start() {
    mkdir -p "$DOCKER_RUN"
    log "starting dockerd (data-root $DOCKER_DATA, logs $LOG)"
    # The command line names the run dir, so `down` and a stale check find exactly this daemon.
    setsid dockerd --config-file "$DOCKER_RUN/daemon.json" >>"$LOG" 2>&1 < /dev/null &
    local deadline=$((SECONDS + 60))
    until docker_ok; do
        if ! kill -0 $! 2>/dev/null; then
            tail -20 "$LOG" >&2
            die "dockerd exited during start (log: $LOG)"
        fi
        [ $SECONDS -lt $deadline ] || die "dockerd did not answer on $DOCKER_SOCK within 60s (log: $LOG)"
        sleep 0.5
    done
    docker info -f 'dockerd {{.ServerVersion}}: {{.Driver}}, cgroup {{.CgroupDriver}} v{{.CgroupVersion}}, runtime {{.DefaultRuntime}}' >&2
}

up() {
    if dockerd_running && docker_ok; then
        log "dockerd already running (pid $(dockerd_pid))"
        return 0
    fi
    stage docker-install install_packages
    # A dockerd that died leaves its mounts, shims and pid file: clear them, keep the host state.
    dockerd_running || cleanup_leftovers
    record_host_state
    write_config
    stage dockerd-start start
}

# ---------------------------------------------------------------------------------------------

stop_dockerd() {
    local pid
    pid=$(dockerd_pid) || return 0
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        # dockerd stops its containers (up to their stop timeout) and its containerd on SIGTERM.
        kill -TERM "$pid"
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            log "warning: dockerd did not stop in 60s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDFILE"
}

# Processes, mounts and sockets of a dockerd that is gone.
cleanup_leftovers() {
    local pid m
    # containerd (managed by dockerd) and the shims carry our exec-root in their command line.
    for pid in $(pgrep -f "$DOCKER_RUN/exec" || true); do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in $(pgrep -f "$DOCKER_RUN/exec" || true); do kill -KILL "$pid" 2>/dev/null || true; done
    for m in $(awk -v a="$DOCKER_RUN" -v b="$DOCKER_DATA" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -f "$PIDFILE"
    [ -S "$DOCKER_SOCK" ] && rm -f "$DOCKER_SOCK"
    return 0
}

# Docker's chains (DOCKER, DOCKER-USER, DOCKER-ISOLATION-STAGE-*), every rule jumping to them and
# every rule naming one of docker's bridges. Other rules (kube-proxy's, the local cluster's) stay.
remove_docker_rules() {
    command -v iptables >/dev/null || return 0
    local bridges=$1 table chain rule pattern='-j DOCKER'
    [ -n "$bridges" ] && pattern+="|[io] ($(tr ' ' '|' <<<"${bridges% }"))( |$)"
    for table in filter nat mangle raw; do
        iptables -t "$table" -S >/dev/null 2>&1 || continue
        { iptables -t "$table" -S 2>/dev/null | grep -E '^-A ' | grep -E -- "$pattern" || true; } | sed 's/^-A //' |
            while read -r rule; do eval "iptables -t $table -D $rule" 2>/dev/null || true; done
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N DOCKER/ {print $2}'); do
            iptables -t "$table" -F "$chain" 2>/dev/null || true
        done
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '/^-N DOCKER/ {print $2}'); do
            iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
}

down() {
    if [ ! -f "$STATE" ] && ! dockerd_running; then
        log "dockerd not running (no state in $DOCKER_RUN)"
        cleanup_leftovers
        return 0
    fi
    stop_dockerd
    cleanup_leftovers
    local forward_policy=ACCEPT ip_forward=absent ip6_forward_all=absent ip6_forward_default=absent
    local bridge_nf_iptables=absent bridge_nf_ip6tables=absent links=""
    local had_key_json=1 had_run_docker=1
    # shellcheck disable=SC1090
    [ -f "$STATE" ] && source "$STATE"
    # Interfaces that were not there before dockerd and are named as docker names them: its
    # bridges (br-<network id>, docker0) and host ends of container veths (veth<7 hex>) left over.
    # (Other tests on this machine make veths and bridges too: names decide, nothing broader.)
    local link new_bridges=""
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
        [[ " $links " == *" $link "* ]] && continue
        if [[ $link =~ ^(br-[0-9a-f]{12}|docker0)$ ]]; then
            new_bridges+="$link "
            ip link del "$link" 2>/dev/null || true
        elif [[ $link =~ ^veth[0-9a-f]{7}$ ]]; then
            ip link del "$link" 2>/dev/null || true
        fi
    done
    remove_docker_rules "$new_bridges"
    command -v iptables >/dev/null && iptables -P FORWARD "$forward_policy"
    sysctl_put net/ipv4/ip_forward "$ip_forward"
    sysctl_put net/ipv6/conf/all/forwarding "$ip6_forward_all"
    sysctl_put net/ipv6/conf/default/forwarding "$ip6_forward_default"
    sysctl_put net/bridge/bridge-nf-call-iptables "$bridge_nf_iptables"
    sysctl_put net/bridge/bridge-nf-call-ip6tables "$bridge_nf_ip6tables"
    [ "$had_key_json" = 1 ] || rm -f /etc/docker/key.json
    [ "$had_run_docker" = 1 ] || rm -rf /run/docker
    mkdir -p "$PORTSLICE_CACHE/logs"
    [ -f "$LOG" ] && mv "$LOG" "$PORTSLICE_CACHE/logs/dockerd.log"
    rm -rf "$DOCKER_RUN"
    log "dockerd stopped; host restored (FORWARD policy $forward_policy, ip_forward $ip_forward); images kept in $DOCKER_DATA"
}

status() {
    if dockerd_running && docker_ok; then
        echo "dockerd: running (pid $(dockerd_pid), data-root $DOCKER_DATA)"
        docker ps --format '  {{.Names}}\t{{.Status}}\t{{.Image}}'
    else
        echo "dockerd: stopped"
        return 1
    fi
}

case "${1:-}" in
    up) up ;;
    down) stage docker-down down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
