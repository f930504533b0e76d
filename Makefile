# One-command entry points. Everything installs into ./.venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: venv dataset quickstart test lint wheel bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
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

## Build the wheel and import it (configs, suites, entry points) from outside the checkout.
wheel: venv
	PY=$(PY) bash .ci/check_wheel

clean:
	rm -rf runs lightning_logs .pytest_cache
