# PortSlice: every entry point a developer or CI uses. `make test` is what .ci/run runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export CARGO_TERM_COLOR ?= never

.PHONY: help test lint unit crds it-operator it-datapath e2e bench bench-operator bench-datapath up down

help:
	@echo "make up      - a 3-node kind cluster built here, the chart installed and examples serving"
	@echo "make test    - every test: lint, unit, operator vs real API server, datapath in netns, e2e"
	@echo "make bench   - benchmarks; tables go to docs/BENCHMARKS.md"
	@echo "make crds    - regenerate the CRD YAML from the Rust types"

test:
	bash e2e/scripts/test-all.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace --lib --bins
	cargo test -p portslice-crds --tests

crds:
	cargo run -q -p portslice-crds --bin crdgen > crds/portslice.io_portslices.yaml
	cp crds/portslice.io_portslices.yaml charts/portslice/files/

it-operator:
	bash e2e/scripts/test-operator.sh

it-datapath:
	bash e2e/scripts/test-datapath.sh

e2e:
	bash e2e/scripts/test-e2e.sh

bench: bench-operator bench-datapath

bench-operator:
	bash e2e/scripts/bench-operator.sh

bench-datapath:
	bash e2e/scripts/bench-datapath.sh

up:
	bash e2e/scripts/up.sh

down:
	bash e2e/scripts/kind.sh down
