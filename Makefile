# Every target that runs code depends on `install`, so `make demo` and `make test` work on a
# fresh machine. The install is idempotent: a stamp file records that the venv matches setup.py.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON_BOOTSTRAP ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo study study-kd study-finetune-lr test test-fast bench clean screenshots

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel 2>&1 | sed "/is ignored/d"
	$(PY) -m pip install --quiet -e ".[test]" 2>&1 | sed "/is ignored/d"
	# Real ImageNet/CIFAR photos for tests and benchmarks (data only: no dependencies needed).
	$(PY) -m pip install --quiet --no-deps foolbox==3.3.4 2>&1 | sed "/is ignored/d"
	# ImageNet's 1000 wnids in standard (sorted) index order: timm/data/_info/imagenet_synsets.txt
	# (data only, never imported: `data prepare imagenet-val --labels index` and the tests read it).
	$(PY) -m pip install --quiet --no-deps timm==1.0.31 2>&1 | sed "/is ignored/d"
	# The demo dataset: Debian's Fashion-MNIST (binaryduo data prepare reads it).
	test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; } || \
	  echo "note: install Fashion-MNIST for the demo with: apt-get install dataset-fashion-mnist"
	# DeepSpeed JIT-compiles a shared-memory comm op on first use (~30-60 s): do it once here.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" 2>&1 | tail -1
	$(PY) -c "import binaryduo.models, binaryduo.trainer, binaryduo.data, torch, deepspeed, nvidia.dali, mlflow"
	touch $(STAMP)

# The main job on embedded defaults: Fashion-MNIST prepared, the BNN baseline and BinaryDuo
# (coupled -> decouple -> fine-tune) trained at equal budget, the BinaryDuo network exported to
# OpenVINO and verified on the whole test set, a table read back from MLflow.
demo: install
	$(VENV)/bin/binaryduo demo

# Two pytest-xdist workers, one OpenMP thread per process: the suite is mostly short real
# processes (start-up bound), and two 2-thread torch processes on 2 cores spin against each other
# (measured: two tiny training runs side by side take 34 s with 2 threads each, 14 s with 1).
# tests/conftest.py keeps each module on one worker and starts the longest ones first; pytest-xdist
# would otherwise reorder the modules by test count (--loadscope-reorder, its default), which ran
# the few-test, minutes-long modules (launchers, crash tests, Slurm) last, on one busy worker.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests

# The seed study behind the README's "Seed study" table: BNN vs BinaryDuo on Fashion-MNIST at the
# demo's budget, binary weights (the demo's recipes) and FP weights (their twins), seeds 0-2 (12 runs,
# each like one of `make demo`'s two).
# A `binaryduo sweep`: run it again after an interruption and it continues where it stopped.
STUDY_SEEDS ?= 0-2
STUDY_DB ?= sqlite:///$(CURDIR)/mlflow.db
study: install
	$(VENV)/bin/binaryduo sweep recipes/demo/fashion_mnist_vgg7_bnn.yaml \
	  recipes/demo/fashion_mnist_vgg7_binaryduo.yaml --seeds $(STUDY_SEEDS) \
	  --output runs/study/binary-weights --tracking-uri $(STUDY_DB)
	$(VENV)/bin/binaryduo sweep recipes/studies/fashion_mnist_vgg7_bnn_fp_weights.yaml \
	  recipes/studies/fashion_mnist_vgg7_binaryduo_fp_weights.yaml --seeds $(STUDY_SEEDS) \
	  --output runs/study/fp-weights --tracking-uri $(STUDY_DB)
	$(VENV)/bin/binaryduo compare --by-seed --tracking-uri $(STUDY_DB) --no-paper \
	  --sweep runs/study/binary-weights --baseline fashion_mnist_vgg7_bnn
	$(VENV)/bin/binaryduo compare --by-seed --tracking-uri $(STUDY_DB) --no-paper \
	  --sweep runs/study/fp-weights --baseline fashion_mnist_vgg7_bnn_fp_weights

# The distillation study behind the README's "Small-scale evidence" (issue 18): the demo's
# BinaryDuo against its KD twin (an FP VGG-7 teacher trained first in the same run), seeds 0-2,
# at equal student budget (6 runs; each KD run costs about twice a plain one).
study-kd: install
	$(VENV)/bin/binaryduo sweep recipes/demo/fashion_mnist_vgg7_binaryduo.yaml \
	  recipes/studies/fashion_mnist_vgg7_binaryduo_kd.yaml --seeds $(STUDY_SEEDS) \
	  --output runs/study/kd --tracking-uri $(STUDY_DB)
	$(VENV)/bin/binaryduo compare --by-seed --tracking-uri $(STUDY_DB) --no-paper \
	  --sweep runs/study/kd --baseline fashion_mnist_vgg7_binaryduo

# The fine-tune LR study (README, seed study, "Fine-tune LR"): the demo's BinaryDuo (fine-tune from LR
# 0.1, the authors' setting) against the same recipe fine-tuned from LR 0.01, seeds 0-2.
study-finetune-lr: install
	$(VENV)/bin/binaryduo sweep recipes/demo/fashion_mnist_vgg7_binaryduo.yaml \
	  recipes/studies/fashion_mnist_vgg7_binaryduo_finetune_lr001.yaml --seeds $(STUDY_SEEDS) \
	  --output runs/study/finetune-lr --tracking-uri $(STUDY_DB)
	$(VENV)/bin/binaryduo compare --by-seed --tracking-uri $(STUDY_DB) --no-paper \
	  --sweep runs/study/finetune-lr --baseline fashion_mnist_vgg7_binaryduo

bench: install
	$(PY) benchmarks/quantizer_overhead.py
	$(PY) benchmarks/health_overhead.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/preresize.py
	$(PY) benchmarks/binary_inference.py
	# sized for a GPU (batch 256, 224 px); without CUDA its --quick smoke
	$(PY) benchmarks/train_throughput.py $$($(PY) -c 'import torch; print("" if torch.cuda.is_available() else "--quick")')

clean:
	rm -rf $(VENV) build *.egg-info

# Screenshots of the MLflow UI for the README (docs/mlflow_runs.png, mlflow_run_metrics.png and
# mlflow_system_metrics.png):
# `mlflow server` on a copy of the demo's store (SCREENSHOT_DB, default ./mlflow.db of `make demo`),
# pictures by headless Chromium (apt-get install chromium). Not part of CI.
SCREENSHOT_DB ?= mlflow.db
screenshots: install
	$(PY) docs/make_screenshots.py --db $(SCREENSHOT_DB) --out docs
