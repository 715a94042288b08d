#!/usr/bin/env bash
# Builds the PortSlice images without Docker and imports them into the local cluster's containerd:
#   localhost/portslice-operator:$IMAGE_TAG   the operator (Deployment)
#   localhost/portslice-node:$IMAGE_TAG       the node daemon + CNI plugin (DaemonSet)
#   localhost/portslice-e2e-agent:$IMAGE_TAG  the e2e workload (busybox + portslice-e2e-agent)
# Each image is the release binary plus the shared libraries `ldd` lists, packed as an OCI
# image-layout tar by oci.sh (tars land in $PORTSLICE_CACHE/images, e.g. for `kind load
# image-archive`). The Dockerfiles next to the crates build the same images where Docker exists.
#
# usage: images.sh [--no-import]
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/cluster-env.sh"
source "$(dirname "$0")/oci.sh"

IMAGE_TAG=${IMAGE_TAG:-dev}
OUT=${IMAGES_OUT:-$PORTSLICE_CACHE/images}
import=1
[ "${1:-}" = "--no-import" ] && import=0

build() {
    apt_install busybox-static clang llvm libbpf-dev
    cd "$REPO_ROOT"
    cargo build --release -p portslice-operator -p portslice-cni -p portslice-e2e \
        --bin portslice-operator --bin portslice --bin portslice-e2e-agent
}

passwd() { # ROOT: a non-root user for the operator's runAsNonRoot
    mkdir -p "$1/etc" "$1/tmp"
    chmod 1777 "$1/tmp"
    printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' > "$1/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' > "$1/etc/group"
}

pack() {
    local bin=$REPO_ROOT/target/release root
    mkdir -p "$OUT"

    root=$(mktemp -d)
    passwd "$root"
    oci_add_elf "$root" "$bin/portslice-operator" /usr/local/bin/portslice-operator
    oci_pack "localhost/portslice-operator:$IMAGE_TAG" "$root" "$OUT/portslice-operator.tar" \
        '["/usr/local/bin/portslice-operator"]'
    rm -rf "$root"

    root=$(mktemp -d)
    passwd "$root"
    oci_add_elf "$root" "$bin/portslice" /usr/local/bin/portslice
    oci_pack "localhost/portslice-node:$IMAGE_TAG" "$root" "$OUT/portslice-node.tar" \
        '["/usr/local/bin/portslice"]'
    rm -rf "$root"

    root=$(mktemp -d)
    passwd "$root"
    mkdir -p "$root/bin"
    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in sh cat echo sleep nslookup ip ping hostname ls ps wget; do ln -s busybox "$root/bin/$applet"; done
    oci_add_elf "$root" "$bin/portslice-e2e-agent" /bin/portslice-e2e-agent
    oci_pack "localhost/portslice-e2e-agent:$IMAGE_TAG" "$root" "$OUT/portslice-e2e-agent.tar" \
        '["/bin/portslice-e2e-agent"]' '["PATH=/bin"]'
    rm -rf "$root"
    ls -l "$OUT"/portslice-*.tar >&2
}

import_all() {
    [ -S "$CONTAINERD_SOCK" ] || die "containerd of the local cluster is not running ($CONTAINERD_SOCK); run cluster.sh up"
    local t
    for t in portslice-operator portslice-node portslice-e2e-agent; do oci_import "$OUT/$t.tar"; done
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q | grep "^localhost/portslice-.*:$IMAGE_TAG$" >&2
}

stage cargo-build-release build
stage pack-images pack
[ $import -eq 1 ] && stage import-images import_all
exit 0
