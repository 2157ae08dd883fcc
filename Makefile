# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The main job, CPU-sized: a real multirun on the built-in phantom, then the sweep report.
demo: $(STAMP)
	$(PY) -m lung_cls.train -m experiment=demo

# The test suite (what CI runs). Slow tests included; GPU tests skip without a GPU.
test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check lung_cls tests experiments
	$(VENV)/bin/ruff format --check lung_cls tests experiments

bench: $(STAMP)
	$(PY) experiments/bench/preprocess.py
	$(PY) experiments/bench/overhead.py
	$(PY) experiments/bench/predict.py
	$(PY) experiments/bench/memory.py

clean:
	rm -rf outputs .pytest_cache
