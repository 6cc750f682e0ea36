# wsgate — set-up, run, test. Every target installs what it needs, idempotently.
#
#   make run          create .venv, install wsgate into it, run etc/wsgate.ini
#   make test         the whole test suite (installs the test peers first)
#   make conformance  the full Autobahn testsuite (all cases, ~35 min) + README summary

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SOURCES := setup.cfg pyproject.toml $(shell find wsgate twisted -name '*.py' 2>/dev/null)

.PHONY: run test conformance peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installed non-editably, as a user would; reinstalled when a source changes.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/twistd -n --pidfile= wsgate --config etc/wsgate.ini

peers:
	bash scripts/install-peers.sh

test: $(STAMP) peers
	$(BIN)/pytest -q -p no:cacheprovider tests

conformance: $(STAMP) peers
	$(BIN)/python scripts/conformance.py --cases all --update-readme

clean:
	rm -rf $(VENV) .venv-wstest build *.egg-info reports
