# Every target bootstraps what it needs: a fresh clone only needs `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export CREDITS_CONFIG ?= credits.toml

.PHONY: install run test bench lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

# The embedded SQLite database and the shipped sample catalogue; dev tokens are printed at start.
run: install
	$(BIN)/credits migrate
	$(BIN)/credits serve --dev --host 127.0.0.1 --port 8000

# Runs every test on SQLite and on PostgreSQL (TEST_DATABASE_URL, else 127.0.0.1:5432,
# else a throwaway cluster from the installed PostgreSQL binaries).
test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m bench

# ruff (lint and format), mypy (strict on the service's packages) and the layers import-linter holds.
lint: install
	$(BIN)/ruff check service webhooks jobs tests bench
	$(BIN)/ruff format --check service webhooks jobs tests bench
	$(BIN)/mypy --strict service webhooks jobs
	$(BIN)/mypy --follow-imports=silent tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) *.egg-info credits.db credits.db-wal credits.db-shm
