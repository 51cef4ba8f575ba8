# `make test` and `make demo` each set up their own virtual environment on a fresh machine.
# TORCH picks the PyTorch build: the default pin installs the CPU wheel where one is provided locally
# (and PyPI's default build elsewhere); e.g. `make test TORCH=torch` takes the newest CUDA build from PyPI,
# or `TORCH="torch --index-url https://download.pytorch.org/whl/cpu"` a CPU build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo demo-attention sample gpu-test clean

# the venv with PyTorch, then the package with the extras each target needs: plot (matplotlib, tqdm) for the
# demos, test (pytest, hypothesis, plot and hf = transformers) for the tests
$(VENV)/.torch: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# trains a small LongNetLM to retrieve a passkey across 8,192 tokens (CPU, about 2 minutes on 2 cores)
demo: $(VENV)/.installed-plot
	$(PY) examples/train_lm.py

# asks the model trained by `make demo` for passkeys of fresh prompts (KV-cache generation)
sample: $(VENV)/.installed-plot
	$(PY) examples/sample.py

# dilated attention over 65,536 tokens: checked against the reference, timed, its pattern drawn
demo-attention: $(VENV)/.installed-plot
	$(PY) examples/demo.py

gpu-test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m gpu -s

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
