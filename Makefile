# wsgate — set-up, run, test. Every target installs what it needs, idempotently.
#
#   make run          create .venv, install wsgate into it, run etc/wsgate.ini
#   make test         the whole test suite (installs the test peers first)
#   make lint         ruff over the tree, mypy over the hinted modules (pyproject.toml)
#   make conformance  the full Autobahn testsuite (all cases; echo, proxy, TLS proxy: ~50 min)
#                     + README summary
#   make bench        the benchmark suite (~25 min; bench/run.py --quick: ~3 min)
#   make deb          build dist/deb/wsgate_VERSION_amd64.deb and lintian it (root)
#   make deb-test     .deb build, lintian, install, run as the unit would, reload, stop, purge (root)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LINT_STAMP := $(VENV)/.lint-stamp
SOURCES := setup.cfg pyproject.toml $(shell find wsgate twisted -name '*.py' 2>/dev/null)

.PHONY: run test lint conformance peers clean deb deb-test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installed non-editably, as a user would; reinstalled when a source changes.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q '.[test]'
	touch $@

# The `lint` extra, beside wsgate's dependencies (mypy reads their types);
# reinstalled when the packaging files change. `make test` is not needed first.
$(LINT_STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q '.[lint]'
	touch $@

# make run CONFIG=my.ini runs another config file.
CONFIG ?= etc/wsgate.ini

run: $(STAMP)
	$(BIN)/twistd -n --pidfile= wsgate --config $(CONFIG)

peers:
	bash scripts/install-peers.sh

# The whole suite, then the wire-level tests and conformance again with the
# Twisted-level fast paths off ([wsgate] fast_paths = no).
test: $(STAMP) peers
	$(BIN)/pytest -q -p no:cacheprovider tests
	WSGATE_TEST_FAST_PATHS=no $(BIN)/pytest -q -p no:cacheprovider \
	    tests/test_wire.py tests/test_proxy.py tests/test_conformance.py

# Both run, so that one's findings do not hide the other's; caches go in the venv.
lint: $(LINT_STAMP)
	$(BIN)/ruff check --output-format concise --cache-dir $(VENV)/.ruff_cache .; \
	    ruff=$$?; $(BIN)/mypy --cache-dir $(VENV)/.mypy_cache && exit $$ruff

# Targets echo, proxy and proxy-tls; both verdicts (behavior, behaviorClose) counted.
conformance: $(STAMP) peers
	$(BIN)/python scripts/conformance.py --cases all --targets echo,proxy,proxy-tls \
	    --update-readme

# Installs its own peers (nginx, bench/node_modules, matplotlib) through bench/setup.sh;
# prints the table, writes bench/results/ (latest.json, README-table.rst, ratios.png).
bench: $(STAMP) peers
	$(BIN)/python bench/run.py

# Root; installs the build dependencies where missing. Artifacts in dist/deb/.
deb:
	bash scripts/deb-cycle.sh --build-only

# The whole cycle; needs ports 8080 and 8081 free (the default config's).
# Under CI=true the test suite runs it too (tests/test_debian.py).
deb-test:
	bash scripts/deb-cycle.sh

clean:
	rm -rf $(VENV) .venv-wstest build dist *.egg-info reports
