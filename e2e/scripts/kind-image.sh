#!/usr/bin/env bash
# kind (from its Go module) and a kind node image for Kubernetes v$K8S_VERSION, built on this
# machine without any container registry. Prints the node image's name on stdout (the only thing
# on stdout); everything else goes to stderr. Needs dockerd (docker.sh up).
#
# The node image is assembled the way kind's own `kind build node-image` does it, minus the pulls:
#  1. base image portslice/kind-base:<hash>: a Debian bookworm rootfs from debootstrap with what
#     kind's base image has (systemd, containerd, runc, CNI plugins, iptables, ...) and kind's own
#     node files (entrypoint, systemd units, kubelet drop-ins, containerd config) taken at build
#     time from the kind Go module, then `docker import`ed. Bookworm, not kind's trixie: systemd
#     256+ no longer boots on cgroup v1, which is what this machine has (bookworm's is 252).
#  2. node image portslice/kind-node:v$K8S_VERSION-<hash>: a container of the base gets kubeadm,
#     kubelet, kubectl (the cached v$K8S_VERSION builds), crictl, /kind/version, and every image
#     `kubeadm config images list` names, imported into its containerd's k8s.io namespace under
#     exactly those names (plus containerd's sandbox image); then `docker commit`.
# Each image is rebuilt only when it is missing or a hash of its inputs changed (the build steps'
# code, versions, package list, binaries); the hash is in the tag and in a label.
#
# Images preloaded (all built here):
#   kube-apiserver, kube-controller-manager, kube-scheduler   the cached static binaries
#   kube-proxy    the binary + iptables (legacy and nft, with a backend picker) from this host
#   etcd          v$ETCD_VERSION from go.etcd.io/etcd/server/v3: kubeadm 1.34 passes etcd 3.6 flags
#                 (--feature-gates=InitialCorruptCheck=true, --watch-progress-notify-interval) that
#                 Debian's etcd 3.4 rejects, and kubeadm cannot drop a flag through a patch
#   coredns, pause   base-images.sh's tars, retagged
#
# usage: kind-image.sh [--kind-only]
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oci.sh"
source "$(dirname "$0")/base-images.sh"

KIND_VERSION=${KIND_VERSION:-0.33.0}
ETCD_VERSION=${ETCD_VERSION:-3.6.5}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
KIND_BASE_REPO=portslice/kind-base
KIND_NODE_REPO=portslice/kind-node
ETCD_BIN=$PORTSLICE_CACHE/etcd-v$ETCD_VERSION/bin/etcd
WORK_ROOT=$PORTSLICE_CACHE/tmp
# What kind's base image installs, less what only rootless (fuse-overlayfs), NFS/iSCSI storage
# tests or Debian's own containerd packaging would bring; plus socat and dbus.
NODE_PACKAGES=(
    systemd systemd-sysv dbus
    containerd runc containernetworking-plugins
    conntrack iptables nftables iproute2 ethtool socat util-linux mount kmod
    libseccomp2 pigz e2fsprogs
    bash ca-certificates curl jq procps
)
K8S_NODE_BINARIES=(kubeadm kubelet kubectl)
K8S_IMAGE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy)

# All output but the image name goes to stderr.
exec 3>&1 1>&2

# ---------------------------------------------------------------------------------------------
# tools

kind_tool() {
    if [ -x "$TOOLS_BIN/kind" ] && "$TOOLS_BIN/kind" version 2>/dev/null | grep -q "^kind v$KIND_VERSION "; then
        return 0
    fi
    log "building kind v$KIND_VERSION from sigs.k8s.io/kind"
    mkdir -p "$TOOLS_BIN"
    GOBIN="$TOOLS_BIN" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@v$KIND_VERSION"
}

kind_module_dir() {
    local dir
    dir=$(cd /tmp && go mod download -json "sigs.k8s.io/kind@v$KIND_VERSION" | jq -r .Dir)
    [ -f "$dir/images/base/files/usr/local/bin/entrypoint" ] || die "kind module at '$dir' has no node entrypoint"
    echo "$dir"
}

k8s_binaries() {
    local missing=() b
    for b in "${K8S_NODE_BINARIES[@]}" "${K8S_IMAGE_BINARIES[@]}"; do
        [ -x "$K8S_BIN/$b" ] || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    # One build of the Kubernetes module at a time: wait for one already running.
    while pgrep -f 'e2e/scripts/build-k8s.sh' >/dev/null; do
        log "waiting for the running build-k8s.sh (missing: ${missing[*]})"
        sleep 20
    done
    bash "$REPO_ROOT/e2e/scripts/build-k8s.sh" "${missing[@]}"
}

# etcd 3.6's server module carries replace directives (so `go install mod@v` refuses it): build it
# from a wrapper module that requires it, as build-k8s.sh does for Kubernetes.
etcd_binary() {
    [ -x "$ETCD_BIN" ] && return 0
    local src=$PORTSLICE_CACHE/etcd-v$ETCD_VERSION/src
    mkdir -p "$src" "$(dirname "$ETCD_BIN")"
    log "building etcd v$ETCD_VERSION from go.etcd.io/etcd/server/v3"
    (
        cd "$src"
        if [ ! -f go.sum ]; then
            printf 'module portslice.io/etcdbuild\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" > go.mod
            printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
            go mod tidy
        fi
        CGO_ENABLED=0 go build -tags tools -trimpath -ldflags "-s -w" -o "$ETCD_BIN.tmp" go.etcd.io/etcd/server/v3
    )
    mv "$ETCD_BIN.tmp" "$ETCD_BIN"
    "$ETCD_BIN" --version >&2
}

tools() {
    apt_install debootstrap iptables busybox-static gcc libc6-dev jq
    stage kind-binary kind_tool
    stage k8s-binaries k8s_binaries
    stage crictl build_go_tool crictl "sigs.k8s.io/cri-tools/cmd/crictl@v$CRICTL_VERSION"
    stage coredns build_go_tool coredns "github.com/coredns/coredns@v$COREDNS_VERSION"
    stage etcd etcd_binary
    stage base-image-tars base_image_tars
}

# ---------------------------------------------------------------------------------------------
# base image

# Runs kind's base-image steps on a debootstrapped rootfs: kind's files from its module, the
# paths of Debian's packages where kind's files expect its own builds, and the same systemd
# trimming as kind's Dockerfile.
install_kind_files() { # ROOT KIND_DIR
    local root=$1 files=$2/images/base/files
    install -m 0755 "$files"/usr/local/bin/* "$root/usr/local/bin/"
    mkdir -p "$root/kind/bin"
    install -m 0644 "$files"/kind/README.txt "$root/kind/"
    install -m 0755 "$files"/kind/bin/* "$root/kind/bin/"
    install -m 0644 "$files"/etc/crictl.yaml "$root/etc/"
    install -m 0644 "$files"/etc/containerd/config.toml "$root/etc/containerd/"
    install -m 0644 "$files"/etc/default/kubelet "$root/etc/default/"
    install -m 0644 "$files"/etc/sysctl.d/* "$root/etc/sysctl.d/"
    mkdir -p "$root/etc/systemd/system/kubelet.service.d"
    local unit
    for unit in containerd.service kubelet.service kubelet.slice undo-mount-hacks.service; do
        install -m 0644 "$files/etc/systemd/system/$unit" "$root/etc/systemd/system/"
    done
    install -m 0644 "$files"/etc/systemd/system/kubelet.service.d/* "$root/etc/systemd/system/kubelet.service.d/"

    # kind's units and config name its own builds in /usr/local and /opt/cni/bin.
    ln -sf /usr/bin/containerd "$root/usr/local/bin/containerd"
    mkdir -p "$root/opt/cni/bin"
    local p
    for p in host-local loopback ptp portmap bridge; do ln -f "$root/usr/lib/cni/$p" "$root/opt/cni/bin/$p"; done
    # containerd's base OCI spec, with kind's createContainer hook and without rlimits.
    chroot "$root" ctr oci spec |
        jq '.hooks.createContainer = ((.hooks.createContainer // []) + [{"path": "/kind/bin/mount-product-files.sh"}]) | del(.process.rlimits)' \
        > "$root/etc/containerd/cri-base.json"

    # bpffs: neither kind's entrypoint nor systemd (in a container) mounts it; the PortSlice node
    # daemon pins its maps there and mounts it into its pod with Bidirectional propagation.
    cat > "$root/etc/systemd/system/portslice-bpffs.service" <<'EOF'
[Unit]
Description=Mount bpffs at /sys/fs/bpf (shared) for eBPF programs of pods
DefaultDependencies=no
Before=containerd.service kubelet.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -euc 'mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=700 bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf'
[Install]
WantedBy=multi-user.target
EOF

    # systemd in a container: only what a node needs (as kind's Dockerfile trims it).
    rm -f "$root"/lib/systemd/system/sysinit.target.wants/systemd-tmpfiles-setup.service \
        "$root"/lib/systemd/system/multi-user.target.wants/* \
        "$root"/etc/systemd/system/*.wants/* \
        "$root"/lib/systemd/system/local-fs.target.wants/* \
        "$root"/lib/systemd/system/sockets.target.wants/*udev* \
        "$root"/lib/systemd/system/sockets.target.wants/*initctl* \
        "$root"/lib/systemd/system/basic.target.wants/*
    echo "ReadKMsg=no" >> "$root/etc/systemd/journald.conf"
    [ -e "$root/sbin/init" ] || ln -s /usr/lib/systemd/systemd "$root/sbin/init"
    chroot "$root" systemctl enable kubelet.service containerd.service undo-mount-hacks.service portslice-bpffs.service
    chroot "$root" systemctl mask systemd-binfmt.service
    mkdir -p "$root/etc/kubernetes/manifests"

    # No apt state, docs or host files in the image; docker provides resolv.conf and hostname,
    # kind's entrypoint the machine id.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/*
    rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
    : > "$root/etc/machine-id"
}

build_base() { # TAG KIND_DIR
    local tag=$1 kind_dir=$2 root
    mkdir -p "$WORK_ROOT"
    root=$(mktemp -d "$WORK_ROOT/kind-base.XXXXXX")
    # debootstrap mounts /proc, /sys and /dev/pts in the target; never leave them behind.
    trap "umount_under '$root'; rm -rf '$root'" EXIT
    log "debootstrap $DEBIAN_SUITE (${#NODE_PACKAGES[@]} packages + dependencies) into $root"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${NODE_PACKAGES[*]}")" \
        "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" > "$WORK_ROOT/debootstrap.log" 2>&1 ||
        { tail -30 "$WORK_ROOT/debootstrap.log" >&2; die "debootstrap failed (log: $WORK_ROOT/debootstrap.log)"; }
    umount_under "$root"
    install_kind_files "$root" "$kind_dir"
    log "docker import $tag"
    tar -C "$root" --numeric-owner -c . | docker import - "$tag-rootfs" >/dev/null
    # The image settings kind's node image has (systemd: `container` tells it where it runs, and
    # it exits on SIGRTMIN+3, not SIGTERM). `docker import --change` takes no STOPSIGNAL, so a
    # one-line build on top adds them (the legacy builder: no BuildKit/buildx here).
    printf '%s\n' "FROM $tag-rootfs" 'ENV container=docker' 'STOPSIGNAL SIGRTMIN+3' \
        'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' "LABEL io.portslice.inputs=${tag##*:}" |
        DOCKER_BUILDKIT=0 docker build -q -t "$tag" - >/dev/null 2>"$WORK_ROOT/docker-build.log" ||
        { cat "$WORK_ROOT/docker-build.log" >&2; die "docker build of $tag failed"; }
    docker rmi "$tag-rootfs" >/dev/null
    umount_under "$root"
    rm -rf "$root"
    trap - EXIT
}

umount_under() {
    local m
    for m in $(awk -v p="$1" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}

base_hash() {
    {
        echo "$KIND_VERSION $DEBIAN_SUITE $DEBIAN_MIRROR ${NODE_PACKAGES[*]}"
        declare -f install_kind_files build_base
    } | sha256sum | cut -c1-16
}

# ---------------------------------------------------------------------------------------------
# component images (OCI tars named as kubeadm expects)

# iptables for kube-proxy: the host's (Debian bookworm, like the node) legacy and nft binaries,
# their extensions and libraries, and a picker that points the iptables names at the backend the
# node already uses (the kubelet's KUBE-IPTABLES-HINT chain, else the one with more rules).
add_iptables() { # ROOT
    local root=$1 bin lib so
    mkdir -p "$root/bin" "$root/usr/sbin"
    cp /bin/busybox "$root/bin/busybox"
    for bin in sh grep wc ln cat; do ln -sf busybox "$root/bin/$bin"; done
    for bin in xtables-legacy-multi xtables-nft-multi; do oci_add_elf "$root" "/usr/sbin/$bin"; done
    local xt=/usr/lib/x86_64-linux-gnu/xtables
    mkdir -p "$root$xt"
    for so in "$xt"/*.so; do
        cp -L "$so" "$root$so"
        for lib in $(ldd "$so" 2>/dev/null | grep -oE '/[^ ]+' || true); do
            [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
        done
    done
    for bin in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
        ln -sf xtables-legacy-multi "$root/usr/sbin/${bin%%-*}-legacy${bin#${bin%%-*}}"
        ln -sf xtables-nft-multi "$root/usr/sbin/${bin%%-*}-nft${bin#${bin%%-*}}"
        ln -sf iptables-wrapper "$root/usr/sbin/$bin"
    done
    cat > "$root/usr/sbin/iptables-wrapper" <<'EOF'
#!/bin/sh
# PortSlice kind image: on first use, point the iptables names at the backend the node uses.
set -e
# The kubelet's chains live in mangle. nft first: listing a legacy table creates it (empty).
hint='KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY'
if (xtables-nft-multi iptables-save -t mangle; xtables-nft-multi ip6tables-save -t mangle) 2>/dev/null | grep -Eq "$hint"; then
    mode=nft
elif (xtables-legacy-multi iptables-save -t mangle; xtables-legacy-multi ip6tables-save -t mangle) 2>/dev/null | grep -Eq "$hint"; then
    mode=legacy
else
    legacy=$( (xtables-legacy-multi iptables-save; xtables-legacy-multi ip6tables-save) 2>/dev/null | grep -c '^-' || true)
    nft=$( (xtables-nft-multi iptables-save; xtables-nft-multi ip6tables-save) 2>/dev/null | grep -c '^-' || true)
    if [ "${legacy:-0}" -gt "${nft:-0}" ]; then mode=legacy; else mode=nft; fi
fi
for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf "xtables-$mode-multi" "/usr/sbin/$name.new" && mv -f "/usr/sbin/$name.new" "/usr/sbin/$name"
done
exec "$0" "$@"
EOF
    chmod 0755 "$root/usr/sbin/iptables-wrapper"
}

component_tars() { # OUTDIR
    local out=$1 b root
    for b in "${K8S_IMAGE_BINARIES[@]}"; do
        root=$(mktemp -d "$WORK_ROOT/img.XXXXXX")
        mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/etc"
        chmod 1777 "$root/tmp"
        cp "$K8S_BIN/$b" "$root/usr/local/bin/$b"
        [ "$b" = kube-proxy ] && add_iptables "$root"
        oci_pack "registry.k8s.io/$b:v$K8S_VERSION" "$root" "$out/$b.tar" "[\"/usr/local/bin/$b\"]"
        rm -rf "$root"
    done
    root=$(mktemp -d "$WORK_ROOT/img.XXXXXX")
    mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/var/lib/etcd"
    chmod 1777 "$root/tmp"
    cp "$ETCD_BIN" "$root/usr/local/bin/etcd"
    oci_pack "registry.k8s.io/etcd:$(etcd_image_tag)" "$root" "$out/etcd.tar" '["/usr/local/bin/etcd"]'
    rm -rf "$root"
}

etcd_image_tag() {
    "$K8S_BIN/kubeadm" config images list --kubernetes-version "v$K8S_VERSION" 2>/dev/null |
        sed -n 's|^registry.k8s.io/etcd:||p'
}

# ---------------------------------------------------------------------------------------------
# node image

node_hash() { # BASE_TAG
    {
        echo "$1 $K8S_VERSION $KIND_VERSION $ETCD_VERSION $COREDNS_VERSION $CRICTL_VERSION"
        dpkg-query -W -f '${Package} ${Version}\n' iptables busybox-static
        cd "$REPO_ROOT/e2e"
        sha256sum scripts/kind-image.sh scripts/base-images.sh scripts/oci.sh images/pause/pause.c
        local b
        for b in "${K8S_NODE_BINARIES[@]}" "${K8S_IMAGE_BINARIES[@]}"; do sha256sum "$K8S_BIN/$b"; done
        sha256sum "$TOOLS_BIN/crictl" "$TOOLS_BIN/coredns" "$ETCD_BIN" "$IMAGES/pause.tar" "$IMAGES/coredns.tar"
    } | sha256sum | cut -c1-16
}

build_node() { # BASE_TAG NODE_TAG
    local base=$1 tag=$2 work build
    mkdir -p "$WORK_ROOT"
    work=$(mktemp -d "$WORK_ROOT/kind-node.XXXXXX")
    build="portslice-kind-build-$$"
    trap "docker rm -f '$build' >/dev/null 2>&1 || true; rm -rf '$work'" EXIT

    # Files for the node, streamed into the build container as one tar.
    local stage_dir=$work/root
    mkdir -p "$stage_dir/usr/bin" "$stage_dir/usr/local/bin" "$stage_dir/kind/images"
    local b
    for b in "${K8S_NODE_BINARIES[@]}"; do install -m 0755 "$K8S_BIN/$b" "$stage_dir/usr/bin/$b"; done
    install -m 0755 "$TOOLS_BIN/crictl" "$stage_dir/usr/local/bin/crictl"
    printf 'v%s' "$K8S_VERSION" > "$stage_dir/kind/version"
    stage component-images component_tars "$stage_dir/kind/images"
    cp "$IMAGES/pause.tar" "$IMAGES/coredns.tar" "$stage_dir/kind/images/"

    # The names kubeadm wants, and the sandbox image of kind's containerd config.
    local required sandbox
    required=$("$K8S_BIN/kubeadm" config images list --kubernetes-version "v$K8S_VERSION")
    sandbox=$(sed -n 's/^ *sandbox_image *= *"\(.*\)"/\1/p' "$(kind_module_dir)/images/base/files/etc/containerd/config.toml")
    [ -n "$sandbox" ] || die "no sandbox_image in kind's containerd config"
    local pause_ref coredns_ref
    pause_ref=$(grep '/pause:' <<<"$required")
    coredns_ref=$(grep '/coredns:' <<<"$required")

    docker run -d --name "$build" --network none --entrypoint sleep "$base" infinity >/dev/null
    tar -C "$stage_dir" --owner=0 --group=0 --numeric-owner -c . | docker cp - "$build:/"
    # containerd only stores content here (no unpack: the build container has no overlayfs
    # mounts to offer); the node's CRI unpacks an image when a container first uses it. The
    # node's /var is a volume that docker fills from the image, so the store lands in each node.
    docker exec "$build" bash -euc '
        containerd >/tmp/containerd.log 2>&1 &
        pid=$!
        for i in $(seq 1 50); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done
        ctr version >/dev/null || { cat /tmp/containerd.log; exit 1; }
        for t in /kind/images/*.tar; do
            ctr -n k8s.io images import --no-unpack --all-platforms "$t" >/dev/null
        done
        ctr -n k8s.io images tag localhost/portslice/pause:e2e "$1" >/dev/null
        [ "$2" = "$1" ] || ctr -n k8s.io images tag localhost/portslice/pause:e2e "$2" >/dev/null
        ctr -n k8s.io images tag localhost/portslice/coredns:v'"$COREDNS_VERSION"' "$3" >/dev/null
        ctr -n k8s.io images rm localhost/portslice/pause:e2e localhost/portslice/coredns:v'"$COREDNS_VERSION"' >/dev/null
        ctr -n k8s.io images ls -q > /kind/preloaded-images
        kill "$pid"; wait "$pid" || true
        rm -rf /kind/images /tmp/* /var/log/*
    ' _ "$pause_ref" "$sandbox" "$coredns_ref"
    local missing
    missing=$(docker exec "$build" sh -c 'cat /kind/preloaded-images' | grep -vxF -f - <(printf '%s\n' "$required" "$sandbox") || true)
    [ -z "$missing" ] || die "node image lacks images: $missing"
    docker exec "$build" cat /kind/preloaded-images | sed 's/^/  preloaded: /' >&2
    docker commit \
        --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
        --change 'CMD []' \
        --change "LABEL io.portslice.inputs=${tag##*:}" \
        "$build" "$tag" >/dev/null
    docker rm -f "$build" >/dev/null
    rm -rf "$work"
    trap - EXIT
}

# Older builds of our images are dropped once a new one exists (the cache keeps one of each).
prune_old() { # REPO KEEP_TAG
    local ref
    for ref in $(docker images --format '{{.Repository}}:{{.Tag}}' "$1"); do
        [ "$ref" = "$2" ] || docker rmi "$ref" >/dev/null 2>&1 || true
    done
}

main() {
    local total=$SECONDS
    stage tools tools
    [ "${1:-}" = --kind-only ] && { echo "$TOOLS_BIN/kind" >&3; return 0; }
    docker version >/dev/null 2>&1 || die "dockerd is not running (bash e2e/scripts/docker.sh up)"

    local kind_dir base_tag node_tag
    kind_dir=$(kind_module_dir)
    base_tag="$KIND_BASE_REPO:$DEBIAN_SUITE-$(base_hash)"
    if docker image inspect "$base_tag" >/dev/null 2>&1; then
        log "base image $base_tag cached"
    else
        stage kind-base-image build_base "$base_tag" "$kind_dir"
        prune_old "$KIND_BASE_REPO" "$base_tag"
    fi
    node_tag="$KIND_NODE_REPO:v$K8S_VERSION-$(node_hash "$base_tag")"
    if docker image inspect "$node_tag" >/dev/null 2>&1; then
        log "node image $node_tag cached"
    else
        stage kind-node-image build_node "$base_tag" "$node_tag"
        prune_old "$KIND_NODE_REPO" "$node_tag"
    fi
    log "kind-image ready in $((SECONDS - total))s: $node_tag"
    echo "$node_tag" >&3
}

main "$@"
