# lowrank: the two commands a new user needs are `make install` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED ?= False
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-all clean

install: $(STAMP)

# Re-install only when the project's dependency list changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

# Includes the slow, real-scale checks.
test-all: install
	$(BIN)/python -m pytest tests -m "slow or not slow"

clean:
	rm -rf $(VENV) .pytest_cache
