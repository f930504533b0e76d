# One-command entry points. Everything installs into ./.venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: venv dataset quickstart test lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

dataset:
	@bash scripts/ensure_fashion_mnist.sh

## Train a cosine-triplet (CT) ranker on Fashion-MNIST for a short budget; prints clean metrics.
quickstart: venv dataset
	$(PY) train.py fit --config configs/fashion_mnist_ct.yaml --config configs/budgets/quickstart.yaml

## The test suite (what CI runs).
test: venv dataset
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf runs lightning_logs .pytest_cache
