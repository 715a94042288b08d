#!/usr/bin/env bash
# Builds the Go tools the tests drive (helm, cnitool) from their Go modules into
# $PORTSLICE_CACHE/bin, and the reference CNI plugins at a release newer than Debian's (which stop
# at CNI 1.0.0) into $CNI_PLUGINS_DIR, for the 1.1.0 chains. Skips whatever is already there.
#
# usage: build-tools.sh [helm|cnitool|cni-plugins ...]   (default: all)
source "$(dirname "$0")/lib.sh"

tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(helm cnitool cni-plugins)
mkdir -p "$TOOLS_BIN"
for tool in "${tools[@]}"; do
    if [ "$tool" = cni-plugins ]; then
        for p in ptp bridge host-local portmap loopback; do
            [ -x "$CNI_PLUGINS_DIR/$p" ] && continue
            case $p in host-local) kind=ipam ;; portmap) kind=meta ;; *) kind=main ;; esac
            start=$SECONDS
            log "building CNI plugin $p v$CNI_PLUGINS_VERSION"
            GOBIN="$CNI_PLUGINS_DIR" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
                "github.com/containernetworking/plugins/plugins/$kind/$p@v$CNI_PLUGINS_VERSION"
            log "built $p in $((SECONDS - start))s"
        done
        continue
    fi
    [ -x "$TOOLS_BIN/$tool" ] && continue
    case "$tool" in
        helm) module="helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
              ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION" ;;
        cnitool) module="github.com/containernetworking/cni/cnitool@v$CNI_VERSION"; ldflags="-s -w" ;;
        *) die "unknown tool $tool" ;;
    esac
    start=$SECONDS
    log "building $tool from $module"
    GOBIN="$TOOLS_BIN" CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" "$module"
    log "built $tool in $((SECONDS - start))s"
done
