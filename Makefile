# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv when it is missing and install interplab into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed first and alone so the open torch range in pyproject is already satisfied
# (a CPU build here; set TORCH_SPEC=torch to take whatever pip picks).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint format bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,viz]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/interplab demo

test: $(STAMP)
	$(PY) -m pytest tests/unit tests/integration -q

test-all: $(STAMP)
	$(PY) -m pytest tests -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
