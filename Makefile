# The two set-up commands of README.md: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use. torch is pinned and installed first: an unpinned torch would
# pull a multi-GB CUDA build, while torch==2.13.0 resolves to a local CPU build on our machines.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo lint test test-slow-subset test-all clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch,test,faces,app]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/etalk demo

test: setup
	$(PY) -m pytest -q -n 2 --durations=15

# The slow tests CI runs after `make test` (within ~10 min on 2 cores): the device check's CPU dry
# run, the full-size TPU export, the V-AID joint stage, V-AID learning (projector and Di-CTE), the
# ETHD objective under jit, the loader's worker processes, the MEAD layout and the wheel (configs
# ship, the demo loads them outside the source tree), `etalk app` in headless Chromium, the
# evaluation networks at full size, 20 seeded SIGKILL trials of training, one training step on
# a data x FSDP mesh of 8 simulated devices, ETHD's gradients under remat, `etalk demo` (the
# README's main job: the embedded checkpoint sampled and reported) and `etalk demo --quick` (its
# training path at smoke size) end to end. Left to `make
# test-all`: the ETHD overfit (its smoke version runs in `make test`) and the 500-frame Di-CTE
# generation (over 6 min of CPU alone). -m slow picks the slow tests of the files listed;
# loadfile keeps a file on one worker, so its module fixtures are built once.
SLOW_SUBSET := \
  tests/benchmarks/test_device_check.py \
  tests/layers/test_attention.py \
  tests/train/test_loop.py \
  tests/vaid/test_learning.py::test_projector_pull_loss_falls_tenfold \
  tests/vaid/test_learning.py::test_dicte_loss_falls_tenfold \
  tests/ethd/test_objective.py \
  tests/data_pipeline/test_loader.py \
  tests/data_pipeline/test_synthetic.py \
  tests/test_packaging.py \
  tests/test_app.py \
  tests/evaluation \
  tests/train/test_faults.py::test_sigkill_20_seeded_trials \
  tests/parallel/test_step.py \
  tests/ethd/test_ethd.py::test_rematerialisation_changes_no_gradient \
  tests/demo/test_demo.py::test_quick_demo_trains_every_stage_generates_and_reports \
  tests/demo/test_shipped.py::test_etalk_demo_samples_the_embedded_checkpoint_and_reports

test-slow-subset: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow $(SLOW_SUBSET)

# ruff (pyproject's [tool.ruff]: imports, unused names, line length) and the import graph (no
# cycles; models import nothing above layers/). The suite runs the graph check too.
lint: setup
	$(VENV)/bin/ruff check .
	$(PY) tools/check_imports.py

test-all: setup
	$(PY) -m pytest -q -n 2 -m "not gpu and not tpu"

clean:
	rm -rf $(VENV) build *.egg-info .jax_cache
