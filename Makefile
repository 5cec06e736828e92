# megatron-moe: `make demo` and `make test` are the two commands a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= $(shell if [ -d ../shared/data ]; then echo ../shared/data; else echo ./data; fi)
PYTEST_ARGS ?=
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := requirements.txt requirements-test.txt pyproject.toml setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)

MCORE_VENV ?= .venv-mcore
MCORE_SPEC ?= megatron-core==0.16.1

.PHONY: setup test test-unit test-all demo libaio mcore clean

setup: $(STAMP) mcore

# megatron-core, the peer the router tests compare against (tests/unit/test_router_mcore.py). Its import name is also
# `megatron`, so it gets its own venv with the same torch. Offline or refused: a note, and those tests skip saying why.
mcore: $(MCORE_VENV)/.mcore-stamp

$(MCORE_VENV)/.mcore-stamp:
	@((test -x $(MCORE_VENV)/bin/python || $(PYTHON) -m venv $(MCORE_VENV)) \
	  && $(MCORE_VENV)/bin/pip install -q "$(TORCH_SPEC)" "$(MCORE_SPEC)" 2>&1 | grep -v "^WARNING: Location"; \
	  $(MCORE_VENV)/bin/python -I -c "import megatron.core, torch" 2>/dev/null && touch $@ && echo "megatron-core venv done ($(MCORE_VENV))") \
	  || echo "note: could not install $(MCORE_SPEC) into $(MCORE_VENV); tests/unit/test_router_mcore.py will skip"

# libaio-dev backs the native async I/O op (csrc/aio). Installed through apt when root and missing;
# otherwise the extension is skipped and the aio tests say why.
libaio:
	@if [ ! -e /usr/include/libaio.h ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing libaio-dev (apt)"; \
	    (apt-get install -y -q libaio-dev >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libaio-dev >/dev/null 2>&1)) \
	      || echo "warning: apt-get install libaio-dev failed; the aio op will not be built"; \
	  else \
	    echo "note: libaio-dev missing; install it (sudo apt-get install libaio-dev) to build the aio op"; \
	  fi; \
	fi

$(STAMP): $(SETUP_INPUTS)
	@$(MAKE) --no-print-directory libaio
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PIP) install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	@DS_BUILD_OPS=0 $(PIP) install -q -r requirements-test.txt "$(TORCH_SPEC)" 2>&1 | grep -v "^WARNING: Location" || true
	@PYTHONWARNINGS=ignore $(PIP) install -q --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, numpy, datasets, sentencepiece, megatron, moe" 
	@touch $@
	@echo "setup done ($(VENV))"

# tests/unit (fast, pure), tests/integration (small training runs in-process), tests/cli (real processes where a
# signal, kill or exit code is the point), tests/dist (gloo, multi-process), tests/csrc; the slowest 15 are listed
test: setup
	$(PY) -m pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS) tests

test-unit: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests/unit

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: setup
	DATA_DIR=$(DATA_DIR) PYTHON=$(PY) bash examples_moe/demo.sh

clean:
	rm -rf build *.egg-info $(VENV)/.setup-stamp
