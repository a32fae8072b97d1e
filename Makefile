# The two README commands. Each sets up its own virtual environment in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,flower]'
	touch $(STAMP)

setup: $(STAMP)

## make demo: 5 hospitals on breast cancer, non-IID, with privacy layers on
demo: $(STAMP)
	$(BIN)/privagg demo --out out

## make test: the whole suite (pytest, ruff, mypy)
test: $(STAMP)
	$(BIN)/ruff check secagg dp fl tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache .pytest_cache
