# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
STORE ?= demo-store
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup  ## build the tiny task (cached) and curate a round on it
	$(BIN)/bond demo --store $(STORE)

test: setup  ## the whole suite, as CI runs it
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup  ## everything but the slow tests (Prefect server, Dask, pretraining)
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/generate.py && $(BIN)/python bench/weights.py && $(BIN)/python bench/score.py

clean:
	rm -rf $(STORE)
