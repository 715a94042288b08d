#!/usr/bin/env bash
# Builds the pinned Kubernetes binaries from the k8s.io/kubernetes Go module (through the Go
# module proxy) into $PORTSLICE_CACHE/k8s-v$K8S_VERSION/bin. Skips binaries already there.
#
# k8s.io/kubernetes is not meant to be imported: its go.mod points every k8s.io/* staging module at
# ./staging, which the module zip does not contain. A wrapper module replaces each of them with
# the published v0.X.Y release of the same version, read from k8s.io/kubernetes' own go.mod.
#
# usage: build-k8s.sh [binary...]   (default: all seven: the API server for the tests, the rest for kind)
source "$(dirname "$0")/lib.sh"

binaries=("$@")
[ ${#binaries[@]} -eq 0 ] && binaries=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl kubeadm)

todo=()
for b in "${binaries[@]}"; do [ -x "$K8S_BIN/$b" ] || todo+=("$b"); done
[ ${#todo[@]} -eq 0 ] && { log "kubernetes v$K8S_VERSION binaries cached in $K8S_BIN"; exit 0; }

src="$PORTSLICE_CACHE/k8s-v$K8S_VERSION/src"
mkdir -p "$src" "$K8S_BIN"
cd "$src"
if [ ! -f go.mod ]; then
    log "preparing wrapper module for k8s.io/kubernetes v$K8S_VERSION"
    modfile=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [ -f "$modfile" ] || die "could not download k8s.io/kubernetes@v$K8S_VERSION"
    staging_version="v0.${K8S_VERSION#1.}"
    {
        echo "module portslice.io/k8sbuild"
        echo
        grep -E '^go [0-9]' "$modfile"
        echo
        echo "require k8s.io/kubernetes v$K8S_VERSION"
        echo
        echo "replace ("
        grep -oE 'k8s\.io/[a-z0-9.-]+ => \./staging/src/k8s\.io/[a-z0-9.-]+' "$modfile" |
            awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
        echo ")"
    } > go.mod.new
    mv go.mod.new go.mod
    # Pull the rest of the kubernetes go.mod (its pins) by resolving the commands we build.
    printf 'package tools\n\nimport (\n' > tools.go
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl kubeadm; do
        printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$b" >> tools.go
    done
    printf ')\n' >> tools.go
    sed -i '1i //go:build tools\n' tools.go
    go mod tidy -e >/dev/null 2>&1 || go mod tidy
fi

minor=${K8S_VERSION#1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
for b in "${todo[@]}"; do
    start=$SECONDS
    log "building $b v$K8S_VERSION"
    CGO_ENABLED=0 go build -tags tools -trimpath -ldflags "$ldflags" -o "$K8S_BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b"
    mv "$K8S_BIN/$b.tmp" "$K8S_BIN/$b"
    log "built $b in $((SECONDS - start))s"
done
