# The verbs a newcomer looks for. Each is a thin veneer over the `steward` CLI or the tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format migrate bench install clean docs

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Steward needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install          ## start NATS and every service on the embedded default
	$(BIN)/steward up

test: install         ## lint, type-check and test against real PostgreSQL and NATS
	scripts/test-services.sh
	scripts/test-tools.sh
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/pytest

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: install         ## regenerate the API reference in docs/api from the services' OpenAPI
	$(BIN)/python scripts/api_docs.py

migrate: install
	$(BIN)/steward migrate

bench: install
	scripts/test-services.sh
	$(BIN)/python bench/authz_verify.py
	$(BIN)/python bench/metering.py
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { [ "$$(id -u)" = 0 ] && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; } || true
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .steward .mypy_cache .ruff_cache .pytest_cache
