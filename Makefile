# edgevlm set-up and main jobs. Every target creates or reuses the virtual environment in .venv.
#   make demo   run the whole pipeline on the embedded default (train -> quantize -> export -> run -> bench)
#   make test   run the default test suite (CPU, a few minutes on 2 cores)
#   make test-isa  the ISA-sensitive tests again on an emulated AVX2-only CPU (qemu-user; .ci/run installs it)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP_EXTRA ?=
STAMP  := $(VENV)/.edgevlm-installed

.PHONY: demo test test-isa test-all venv clean

$(STAMP): pyproject.toml constraints.txt
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

# the ISA-sensitive tests on an emulated AVX2-only CPU (needs qemu-user: apt-get install qemu-user)
test-isa: $(STAMP)
	$(PY) -m pytest -q -m isa

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache
