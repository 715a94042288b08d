#!/usr/bin/env bash
# Builds the PortSlice images without Docker, as OCI image-layout tars in $PORTSLICE_CACHE/images
# (for `kind load image-archive`, or `ctr images import` on any containerd node):
#   localhost/portslice-operator:$IMAGE_TAG   the operator (Deployment)
#   localhost/portslice-node:$IMAGE_TAG       the node daemon + CNI plugin (DaemonSet)
#   localhost/portslice-e2e-agent:$IMAGE_TAG  the e2e workload (busybox + portslice-e2e-agent)
#   localhost/portslice-coturn:$IMAGE_TAG     Debian's coturn (+ busybox), for examples/40-coturn.yaml
# Each image is the binary plus the shared libraries `ldd` lists, packed by oci.sh. The
# Dockerfiles next to the crates build the same images where Docker and a registry exist.
#
# env: IMAGE_PROFILE=release (default) or debug: debug reuses the build the tests already made
#      (make test does this; the binaries are stripped of debug info when packed), release is
#      what `make up` ships.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oci.sh"

IMAGE_TAG=${IMAGE_TAG:-dev}
IMAGE_PROFILE=${IMAGE_PROFILE:-release}
OUT=${IMAGES_OUT:-$PORTSLICE_CACHE/images}
case "$IMAGE_PROFILE" in
    release) profile_flag=(--release); bin_dir=$REPO_ROOT/target/release ;;
    debug) profile_flag=(); bin_dir=$REPO_ROOT/target/debug ;;
    *) die "IMAGE_PROFILE must be release or debug, not $IMAGE_PROFILE" ;;
esac

build() {
    apt_install busybox-static clang llvm libbpf-dev binutils coturn
    cd "$REPO_ROOT"
    cargo build "${profile_flag[@]}" -p portslice-operator -p portslice-cni -p portslice-e2e \
        --bin portslice-operator --bin portslice --bin portslice-e2e-agent
}

passwd() { # ROOT: a non-root user for the operator's runAsNonRoot
    mkdir -p "$1/etc" "$1/tmp"
    chmod 1777 "$1/tmp"
    printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' > "$1/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' > "$1/etc/group"
}

# add_bin ROOT BINARY DEST: the binary (without debug info) and its libraries.
add_bin() {
    local tmp; tmp=$(mktemp -d)
    objcopy --strip-debug "$2" "$tmp/$(basename "$2")"
    oci_add_elf "$1" "$tmp/$(basename "$2")" "$3"
    rm -rf "$tmp"
}

pack() {
    local root
    mkdir -p "$OUT"

    root=$(mktemp -d)
    passwd "$root"
    add_bin "$root" "$bin_dir/portslice-operator" /usr/local/bin/portslice-operator
    oci_pack "localhost/portslice-operator:$IMAGE_TAG" "$root" "$OUT/portslice-operator.tar" \
        '["/usr/local/bin/portslice-operator"]'
    rm -rf "$root"

    root=$(mktemp -d)
    passwd "$root"
    add_bin "$root" "$bin_dir/portslice" /usr/local/bin/portslice
    oci_pack "localhost/portslice-node:$IMAGE_TAG" "$root" "$OUT/portslice-node.tar" \
        '["/usr/local/bin/portslice"]'
    rm -rf "$root"

    root=$(mktemp -d)
    passwd "$root"
    mkdir -p "$root/bin"
    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in sh cat echo sleep nslookup ip ping hostname ls ps wget; do ln -s busybox "$root/bin/$applet"; done
    add_bin "$root" "$bin_dir/portslice-e2e-agent" /bin/portslice-e2e-agent
    oci_pack "localhost/portslice-e2e-agent:$IMAGE_TAG" "$root" "$OUT/portslice-e2e-agent.tar" \
        '["/bin/portslice-e2e-agent"]' '["PATH=/bin"]'
    rm -rf "$root"
    root=$(mktemp -d)
    passwd "$root"
    mkdir -p "$root/bin"
    cp /bin/busybox "$root/bin/busybox"
    for applet in sh cat netstat sleep; do ln -s busybox "$root/bin/$applet"; done
    oci_add_elf "$root" /usr/bin/turnserver /usr/bin/turnserver
    oci_pack "localhost/portslice-coturn:$IMAGE_TAG" "$root" "$OUT/portslice-coturn.tar" \
        '["/usr/bin/turnserver"]' '["PATH=/bin:/usr/bin"]'
    rm -rf "$root"
    ls -l "$OUT"/portslice-*.tar >&2
}

stage "cargo-build-$IMAGE_PROFILE" build
stage pack-images pack
