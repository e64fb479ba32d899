# The two set-up commands of README.md: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use. torch is pinned and installed first: an unpinned torch would
# pull a multi-GB CUDA build, while torch==2.13.0 resolves to a local CPU build on our machines.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-all bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch,test,faces]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/etalk demo

test: setup
	$(PY) -m pytest -q -n 2

test-all: setup
	$(PY) -m pytest -q -n 2 -m "not gpu and not tpu"

clean:
	rm -rf $(VENV) build *.egg-info
