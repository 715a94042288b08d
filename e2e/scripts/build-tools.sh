#!/usr/bin/env bash
# Builds the Go tools the tests drive (helm, cnitool) from their Go modules into
# $PORTSLICE_CACHE/bin, skipping any already there.
#
# usage: build-tools.sh [helm|cnitool ...]   (default: all)
source "$(dirname "$0")/lib.sh"

tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(helm cnitool)
mkdir -p "$TOOLS_BIN"
for tool in "${tools[@]}"; do
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
