# Shared settings for the PortSlice scripts. Sourced, not run.
# Everything slow to build lives in one cache directory outside the repo, so a rerun is fast and a
# fresh machine rebuilds what is missing.
set -euo pipefail

PORTSLICE_CACHE=${PORTSLICE_CACHE:-/var/cache/portslice}
# Kubernetes 1.35+ refuses cgroup v1 by default; this machine is cgroup v1, so 1.34 is pinned.
K8S_VERSION=${K8S_VERSION:-1.34.4}
HELM_VERSION=${HELM_VERSION:-3.19.0}
CNI_VERSION=${CNI_VERSION:-1.3.0}
# Debian's containernetworking-plugins (1.1.1) speak CNI up to 1.0.0; this release speaks 1.1.0.
CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-1.7.1}
K8S_BIN="$PORTSLICE_CACHE/k8s-v$K8S_VERSION/bin"
TOOLS_BIN="$PORTSLICE_CACHE/bin"
CNI_PLUGINS_DIR="$PORTSLICE_CACHE/cni-plugins-v$CNI_PLUGINS_VERSION"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

export GOFLAGS=${GOFLAGS:--mod=mod}
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs a command and prints how long it took, so a slow stage is visible in CI logs.
stage() {
    local name=$1; shift
    local start=$SECONDS
    log "stage '$name' starting"
    "$@"
    log "stage '$name' took $((SECONDS - start))s"
}

# Installs Debian packages that are missing (apt-get update only when something is needed).
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_bpffs() {
    mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
}
