# bms-image: `make run` starts the service, `make test` runs the whole suite.
# Every target installs what it needs first, so both work on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
STUBS_STAMP := src/bms/.generated
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The exact versions and hashes every install takes: runtime.lock is what the
# service needs to run, dev.lock adds the build, test and lint tools (make lock).
LOCK := requirements/dev.lock
RUNTIME_LOCK := requirements/runtime.lock
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--custom-compile-command "make lock" --no-config --quiet

.PHONY: run test lint lock lock-check proto install tools clean help bench bench-tools docs

help:
	@echo "make run    - install, generate stubs, start the service on 127.0.0.1:50051"
	@echo "make test   - install, generate stubs, run the whole test suite"
	@echo "make lint   - buf lint and breaking (protos), ruff, mypy, import contracts, lock check"
	@echo "make lock   - re-resolve requirements/*.lock from pyproject.toml"
	@echo "make proto  - regenerate the Python stubs from protos/"
	@echo "make docs   - regenerate docs/api.md (the API reference) from protos/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs exactly the locked versions (pip checks every hash), then the
# project itself without dependencies, built by the locked setuptools.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Re-resolves both locks from pyproject.toml, keeping every pin that still
# fits (uv reads the old lock as its preferences); commit requirements/.
lock: $(VENV)/.installed
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o $(RUNTIME_LOCK)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -o $(LOCK)

lock-check: $(VENV)/.installed
	$(BIN)/python scripts/check_lock.py

install: $(VENV)/.installed tools

# qemu-img converts uploaded QCOW2/VMDK/VHD/VHDX images to raw.
tools:
	@command -v qemu-img >/dev/null || { echo "installing qemu-utils (qemu-img)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq qemu-utils >/dev/null; }

$(STUBS_STAMP): $(PROTOS) $(VENV)/.installed
	rm -rf src/bms
	mkdir -p src
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=src --pyi_out=src --grpc_python_out=src $(PROTOS)
	touch $@

proto: $(VENV)/.installed
	rm -f $(STUBS_STAMP)
	$(MAKE) $(STUBS_STAMP)

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

run: $(STUBS_STAMP) tools
	$(BIN)/bms-image serve

test: $(STUBS_STAMP) node_modules/.installed tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# h2load (Debian's nghttp2-client) drives the metadata benchmark's GetImage load.
bench-tools:
	@command -v h2load >/dev/null || { echo "installing nghttp2-client (h2load)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nghttp2-client >/dev/null; }

# Data-plane benchmark against a bare gRPC baseline, the metadata benchmark
# (GetImage, ListImages at 1k/100k images, create/delete, 1,000 streams), then
# the deployment benchmark (local disk vs EVS, batch of 50), and another project's GetImage
# latency while YAML bombs are refused (bystander), and what tracing costs a
# GetImage (off, on, sampled out); QUICK=1 for the short runs.
bench: $(STUBS_STAMP) tools bench-tools
	$(BIN)/python -m bench.dataplane $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.chunks $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.metadata $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.deploy $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.bystander $(if $(QUICK),--quick,)
	$(BIN)/python -m bench.tracing $(if $(QUICK),--quick,)

lint: $(STUBS_STAMP) node_modules/.installed lock-check
	npx buf lint
	npx buf breaking protos --against api/bms-image-v1.binpb
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

# The API reference, generated from the protos' comments and the error
# reasons raised in src/bms_image (tests/test_api_reference.py keeps it current).
docs: $(VENV)/.installed
	$(BIN)/python scripts/api_reference.py --output docs/api.md

clean:
	rm -rf $(VENV) node_modules src/bms .pytest_cache .mypy_cache
