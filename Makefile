# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create and fill the virtual environment first (idempotent `make install`).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
DEMO_PATIENTS ?= 200

.PHONY: install test lint format demo clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The main job end to end on an embedded default: a synthetic archive, then
# each stage that exists. Override DEMO_DIR / DEMO_PATIENTS to scale it.
demo: install
	$(BIN)/xray-synth --output_dir $(DEMO_DIR)/archive --patients $(DEMO_PATIENTS) --seed 7 --broken 8 --overwrite
	$(BIN)/xray-preprocess --metadata $(DEMO_DIR)/archive/metadata.csv --output_dir $(DEMO_DIR)/preprocessed
	@echo "demo archive: $(DEMO_DIR)/archive; preprocessed shards, splits.csv, rejects/ and manifest.json: $(DEMO_DIR)/preprocessed"

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
