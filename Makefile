# One command for the demo, one for the tests; both create the virtual environment on first use.
# The environment is installed from requirements.lock (exact versions the suite passed with);
# pyproject.toml keeps ranges for people who use evomerge as a library. `make lock` refreshes the lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: setup demo test lint lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip -c $(LOCK)
	# torch first and pinned: the CPU wheel of exactly this version is on the machines' disk.
	$(BIN)/pip install --quiet torch==2.13.0 -c $(LOCK)
	$(BIN)/pip install --quiet -e '.[test]' -c $(LOCK)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# Resolve the newest versions that pyproject.toml allows in a scratch environment and write them down.
# Run `make test` afterwards (it reinstalls from the new lock) before committing the lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet torch==2.13.0
	.lock-venv/bin/pip install --quiet -e '.[test]'
	{ echo "# Exact versions the test suite passed with; written by 'make lock', read by 'make setup'."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^evomerge'; } > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-out
