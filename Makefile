# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create and fill the virtual environment first (idempotent `make install`).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
DEMO_PATIENTS ?= 200

.PHONY: install test test-fast lint format demo clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py beam_pipelines/dicom/_pixel_kernels.c
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: lint
	$(BIN)/python -m pytest

# The edit loop: everything but the end-to-end runs (marked slow).
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The main job end to end on an embedded default: a synthetic archive with a
# few broken rows -> preprocessing (Beam, all cores) -> training (simple CNN,
# CPU) -> batch scoring of the whole archive (+ a DICOM SR per image) ->
# analysis and report.
# Override DEMO_DIR / DEMO_PATIENTS / DEMO_EPOCHS to scale it.
DEMO_EPOCHS ?= 3

demo: install
	$(BIN)/xray-synth --output_dir $(DEMO_DIR)/archive --patients $(DEMO_PATIENTS) --seed 7 --broken 8 --overwrite
	$(BIN)/xray-preprocess --metadata $(DEMO_DIR)/archive/metadata.csv --output_dir $(DEMO_DIR)/preprocessed
	$(BIN)/xray-train --data_dir $(DEMO_DIR)/preprocessed --output_dir $(DEMO_DIR)/results \
		--epochs $(DEMO_EPOCHS) --early_stopping_patience 6
	rm -rf $(DEMO_DIR)/reports  # a new model each demo: its reports replace the last one's
	$(BIN)/xray-score --model $(DEMO_DIR)/results/model --metadata $(DEMO_DIR)/archive/metadata.csv \
		--output $(DEMO_DIR)/predictions/archive --results_dir $(DEMO_DIR)/reports
	$(BIN)/xray-explain --model $(DEMO_DIR)/results/model \
		--predictions $(DEMO_DIR)/results/predictions/test.parquet \
		--data_dir $(DEMO_DIR)/preprocessed --output_dir $(DEMO_DIR)/explain
	$(BIN)/xray-analyze --predictions '$(DEMO_DIR)/results/predictions/*.parquet' \
		--history $(DEMO_DIR)/results/history.csv --manifest $(DEMO_DIR)/preprocessed/manifest.json \
		--gallery $(DEMO_DIR)/explain --output_dir $(DEMO_DIR)/analysis
	@echo
	@echo "Demo finished. Archive: $(DEMO_DIR)/archive  shards: $(DEMO_DIR)/preprocessed"
	@echo "model: $(DEMO_DIR)/results/model  archive scores: $(DEMO_DIR)/predictions"
	@echo "DICOM Structured Reports of the scores: $(DEMO_DIR)/reports"
	@echo "report: $(DEMO_DIR)/analysis/report.html"

# Local Flink and Spark clusters (docs/runners.md): fetch-ENGINE unpacks the
# engine's distribution from PyPI into .tools/ and fetches Beam's job server jar
# with mvn into ~/.m2; cluster-ENGINE starts the cluster and prints the submit
# command (Ctrl-C stops it).
.PHONY: fetch-flink fetch-spark cluster-flink cluster-spark

fetch-flink fetch-spark: install
	$(BIN)/python -m engines fetch $(@:fetch-%=%)

cluster-flink cluster-spark: install
	$(BIN)/python -m engines start $(@:cluster-%=%)

# A local dask.distributed cluster from dask's CLI (a scheduler and two worker
# processes on 127.0.0.1, docs/runners.md); prints the submit flags, Ctrl-C stops it.
.PHONY: cluster-dask
cluster-dask: install
	$(BIN)/python -m engines.dask_cluster

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
