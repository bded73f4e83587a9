# Two commands on a fresh clone: `make serve` and `make test`. Everything else is optional.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# torch is pinned here, not in pyproject.toml: this version is the CPU build available offline on the dev machines.
TORCH_SPEC ?= torch==2.13.0
DATA       ?= ../shared/data/cifar4/train
EXTRA_DATA ?= ../shared/data/cifar-other/train
PRESET     ?= default
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help serve test test-image lint bench bench-compare train image clean cluster cluster-roll proto

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# Runtime dependencies at the versions the image ships and CI tests (deploy/constraints.txt), for every command.
CONSTRAINTS := deploy/constraints.txt

$(VENV)/.runtime: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --constraint $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --constraint $(CONSTRAINTS) "$(TORCH_SPEC)" -e ".[dev,train]"
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime  ## install and serve the shipped models on PORT (default 8080)
	$(BIN)/gunicorn -c python:service.gunicorn_config

cluster: $(VENV)/.runtime  ## REPLICAS (3) replicas behind HAProxy on PORT (8080) with Prometheus; Ctrl-C stops all
	$(BIN)/python deploy/cluster.py up

cluster-roll: $(VENV)/.runtime  ## a rolling update of the `make cluster` running on the same PORT
	$(BIN)/python deploy/cluster.py roll

test: $(VENV)/.dev  ## install dev + train extras and run the whole test suite (image tests: make test-image)
	$(BIN)/pytest -m "not image" $(PYTEST_ARGS)

test-image: $(VENV)/.dev  ## build the container image and test it running (needs root, buildah, debootstrap)
	$(BIN)/pytest -m image $(PYTEST_ARGS)

lint: $(VENV)/.dev  ## ruff
	$(BIN)/ruff check .

bench: $(VENV)/.dev  ## load-test the service as deployed; writes bench/results/*.json
	$(BIN)/python -m bench

bench-compare: $(VENV)/.dev  ## this checkout against REV (a commit), case by case, interleaved: after/before
	@test -n "$(REV)" || { echo "usage: make bench-compare REV=<commit>" >&2; exit 2; }
	$(BIN)/python -m bench.compare $(REV)

train: $(VENV)/.dev  ## train the default model on DATA (+ EXTRA_DATA); PRESET=fast|lenet for others
	$(BIN)/python -m training train --data $(DATA) --extra-data $(EXTRA_DATA) --preset $(PRESET)

proto: $(VENV)/.dev  ## regenerate service/proto/inference_pb2.py(i) from inference.proto (grpcio-tools)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. service/proto/inference.proto

image: ## build the container image (docker if present, else buildah)
	bash deploy/build-image.sh

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
