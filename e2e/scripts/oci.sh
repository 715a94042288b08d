# OCI image helpers without Docker: a rootfs directory becomes an OCI image-layout tar that
# `ctr images import` and `kind load image-archive` read. Sourced, not run.
#
# The layout is the plain one from the OCI image spec: oci-layout, index.json, blobs/sha256/*.
# Layers are uncompressed tars written with a fixed order, owner and mtime, so the same rootfs
# always gives the same digest (and a rebuild of an unchanged image is a no-op in containerd).

# Copies an ELF binary into ROOT at DEST (default: its own path) together with every shared
# library `ldd` lists and the dynamic loader, at their host paths, so glibc binaries run in a
# scratch image.
oci_add_elf() {
    local root=$1 bin=$2 dest=${3:-$2}
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$bin" "$root$dest"
    local lib
    for lib in $(ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+' || true); do
        [ -e "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

_oci_blob() { # FILE LAYOUT -> prints "sha256:<hex> <size>" and stores the blob
    local file=$1 layout=$2 hex size
    hex=$(sha256sum "$file" | cut -d' ' -f1)
    size=$(stat -c %s "$file")
    mkdir -p "$layout/blobs/sha256"
    cp "$file" "$layout/blobs/sha256/$hex"
    echo "sha256:$hex $size"
}

# oci_pack REF ROOTFS OUT.tar ENTRYPOINT_JSON [ENV_JSON]
# e.g. oci_pack localhost/portslice/pause:e2e "$root" pause.tar '["/pause"]'
oci_pack() {
    local ref=$1 rootfs=$2 out=$3 entrypoint=$4 env=${5:-'["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]'}
    local work; work=$(mktemp -d)
    local layout="$work/layout"
    mkdir -p "$layout"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu \
        -C "$rootfs" -cf "$work/layer.tar" .
    local layer_digest layer_size
    read -r layer_digest layer_size < <(_oci_blob "$work/layer.tar" "$layout")
    printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"Env":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["%s"]},"history":[{"created_by":"portslice e2e/scripts/oci.sh"}]}' \
        "$entrypoint" "$env" "$layer_digest" > "$work/config.json"
    local config_digest config_size
    read -r config_digest config_size < <(_oci_blob "$work/config.json" "$layout")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
        "$config_digest" "$config_size" "$layer_digest" "$layer_size" > "$work/manifest.json"
    local manifest_digest manifest_size
    read -r manifest_digest manifest_size < <(_oci_blob "$work/manifest.json" "$layout")
    # io.containerd.image.name is what `ctr images import` names the image after.
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
        "$manifest_digest" "$manifest_size" "$ref" "${ref##*:}" > "$layout/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
    mkdir -p "$(dirname "$out")"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$out.tmp" .
    mv "$out.tmp" "$out"
    rm -rf "$work"
}
