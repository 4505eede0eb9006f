# edgevlm set-up and main jobs. Every target creates or reuses the virtual environment in .venv.
#   make demo   run the whole pipeline on the embedded default (train -> quantize -> export -> run -> bench)
#   make test   run the default test suite (CPU, a few minutes on 2 cores)
#   make test-isa  the ISA-sensitive tests on emulated CPUs: AVX2-only x86-64, and the native kernel's ARM64 path
#                  (qemu-user + gcc-aarch64-linux-gnu; .ci/run installs them)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP_EXTRA ?=
STAMP  := $(VENV)/.edgevlm-installed

.PHONY: demo test test-isa test-all venv clean

# setup.py / decode.c: the editable install builds the native kernel's prebuilt variants in place (a stale one is
# not used: the runtime compiles on demand instead), so a changed kernel source re-installs
$(STAMP): pyproject.toml constraints.txt setup.py edgevlm/runtime/native/decode.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_EXTRA) -c constraints.txt -e ".[export,bench,serve,dev]"
	@$(PY) -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgevlm demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# the ISA-sensitive tests on emulated CPUs: an AVX2-only x86-64 (qemu-x86_64 -cpu EPYC-Milan) and the native kernel
# cross-compiled for ARM64 NEON + dot product (qemu-aarch64 -cpu cortex-a76); they skip, naming what is missing,
# without apt-get install qemu-user gcc-aarch64-linux-gnu
test-isa: $(STAMP)
	$(PY) -m pytest -q -m isa

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache
