# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rxverify-installed

.PHONY: install run test lint test-fast clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# `rxverify up`: migrate, seed, and on the first run the demo dataset, model and keys; then serve on
# RXVERIFY_HOST:RXVERIFY_PORT (default 127.0.0.1:8000) with a local worker until Ctrl-C. Logs are text
# lines for a terminal unless RXVERIFY_LOG_FORMAT says otherwise.
run: install
	RXVERIFY_LOG_FORMAT=$${RXVERIFY_LOG_FORMAT:-text} $(BIN)/rxverify up

lint: install
	$(BIN)/ruff check app worker models migrations tests
	$(BIN)/mypy app worker models migrations

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
