# abvid: `make demo` runs the whole pipeline on a toy corpus; `make test` runs the suite.
# Each target builds .venv first (once; redone when pyproject.toml changes), with the dev and tb extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Torch is pinned here only to what this machine serves from local disk; pyproject.toml asks torch>=2.4.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_DIR ?= demo_out

.PHONY: venv demo test test-fast bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,ray,faiss,tb]'
	touch $@

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/demo.sh $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash tools/bench.sh

gpu-check: venv
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
