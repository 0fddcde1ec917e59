# Every target that runs code depends on `install`, so `make demo` and `make test` work on a
# fresh machine. The install is idempotent: a stamp file records that the venv matches setup.py.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON_BOOTSTRAP ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel 2>&1 | sed "/is ignored/d"
	$(PY) -m pip install --quiet -e ".[test]" 2>&1 | sed "/is ignored/d"
	$(PY) -c "import binaryduo.models, binaryduo.trainer, binaryduo.data, torch, deepspeed, nvidia.dali, mlflow"
	touch $(STAMP)

# The main job on embedded defaults (until the trainer lands): the paper-rule cost table of every
# registered model x variant, then decoupling of every model verified in float64 and float32.
demo: install
	$(VENV)/bin/binaryduo report --all
	$(VENV)/bin/binaryduo analyze decoupling

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/quantizer_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
