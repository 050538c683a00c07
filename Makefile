# One command each: `make demo` runs the main job on embedded defaults,
# `make test` runs the whole suite against real PostgreSQL and Redis.
# Both create the virtualenv and install everything on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install constraints demo test chaos run lint bench clean

# constraints.txt pins every dependency to the version the tests passed with, so a
# fresh machine gets the same; `make constraints` rewrites it from .venv.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

RUN_STAMP := $(VENV)/.installed-run-stamp
$(RUN_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[run]"
	touch $(RUN_STAMP)

install: $(STAMP)

constraints: $(STAMP)
	$(BIN)/python scripts/freeze-constraints.py > constraints.txt

demo: $(STAMP)
	$(BIN)/agentloop demo

test: $(STAMP)
	scripts/ensure-services.sh
	scripts/ensure-browser.sh
	$(BIN)/python -m pytest

# The chaos suite at full count (tests/chaos; `make test` runs one trial per fault).
# It starts PostgreSQL and Redis instances of its own; CHAOS_TRIALS=N to change.
CHAOS_TRIALS ?= 3
chaos: $(STAMP)
	CHAOS_TRIALS=$(CHAOS_TRIALS) CHAOS_REPORT=$(abspath .agentloop/chaos-report.json) \
		$(BIN)/python -m pytest -m chaos -p no:cacheprovider

# Ctrl-C or SIGTERM: each process gets SIGTERM; a worker finishes its running steps
# (warm shutdown) for up to AGENTLOOP_SHUTDOWN_GRACE seconds. honcho 2.0 SIGKILLs
# whatever is left after a fixed 5 s, so it is started with that wait raised to
# the grace plus 5 s.
AGENTLOOP_SHUTDOWN_GRACE ?= 30
export AGENTLOOP_SHUTDOWN_GRACE
HONCHO_KILL_WAIT = import sys, honcho.manager as m, honcho.command as c; \
	m.KILL_WAIT = float(sys.argv.pop(1)) + 5; sys.argv[0] = "honcho"; c.main()

run: $(RUN_STAMP)
	$(BIN)/agentloop db upgrade
	mkdir -p .agentloop
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c '$(HONCHO_KILL_WAIT)' \
		$(AGENTLOOP_SHUTDOWN_GRACE) start

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	scripts/ensure-services.sh
	$(BIN)/python bench/run.py

clean:
	rm -rf .agentloop
