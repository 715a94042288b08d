#!/usr/bin/env bash
# The README's kind quickstart, line for line (a lint check keeps the two identical): what
# `make up` runs. From the repository root, as root.
set -euo pipefail
# >>> quickstart
e2e/scripts/kind.sh up                 # a 3-node kind cluster built on this machine (no registry)
eval "$(e2e/scripts/kind.sh env)"      # KUBECONFIG; kind, helm and kubectl on PATH
e2e/scripts/images.sh                  # the PortSlice images, as tars in $PORTSLICE_CACHE/images
for image in portslice-operator portslice-node portslice-e2e-agent portslice-coturn; do
    kind load image-archive "$PORTSLICE_CACHE/images/$image.tar" --name portslice
done
helm install portslice charts/portslice -n portslice-system --create-namespace --wait
kubectl apply -f examples/
kubectl get portslices -A
# <<< quickstart
