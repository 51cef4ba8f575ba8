# `make test` and `make demo` each set up their own virtual environment on a fresh machine.
# TORCH picks the PyTorch build: the default pin installs the CPU wheel where one is provided locally
# (and PyPI's default build elsewhere); e.g. `make test TORCH=torch` takes the newest CUDA build from PyPI,
# or `TORCH="torch --index-url https://download.pytorch.org/whl/cpu"` a CPU build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo gpu-test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) examples/demo.py

gpu-test: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu -s

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
