# shellcheck shell=bash
# The small images the kind node image (kind-image.sh) preloads, built here without a registry,
# and the Go tools they come from. Sourced (after lib.sh and oci.sh), not run.
#
#   $IMAGES/pause.tar     $PAUSE_IMAGE    e2e/images/pause/pause.c, static
#   $IMAGES/busybox.tar   $BUSYBOX_IMAGE  Debian's busybox-static with the applets the tests use
#   $IMAGES/coredns.tar   $COREDNS_IMAGE  CoreDNS v$COREDNS_VERSION from its Go module
IMAGES=${IMAGES:-$PORTSLICE_CACHE/images}
PAUSE_IMAGE=${PAUSE_IMAGE:-localhost/portslice/pause:e2e}
BUSYBOX_IMAGE=${BUSYBOX_IMAGE:-localhost/portslice/busybox:e2e}
COREDNS_VERSION=${COREDNS_VERSION:-1.12.1}
COREDNS_IMAGE=${COREDNS_IMAGE:-localhost/portslice/coredns:v$COREDNS_VERSION}
CRICTL_VERSION=${CRICTL_VERSION:-1.34.0}

build_go_tool() { # NAME MODULE@VERSION — cached in $TOOLS_BIN
    [ -x "$TOOLS_BIN/$1" ] && return 0
    log "building $1 from $2"
    mkdir -p "$TOOLS_BIN"
    GOBIN="$TOOLS_BIN" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$2"
}

# Builds the tars that are missing (CoreDNS needs build_go_tool coredns ... first).
base_image_tars() {
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
}
