# kvmrun — `make demo` boots a tiny guest; `make test` runs every test.
# Both set everything up on a fresh Debian/Ubuntu machine (QEMU from the distribution, a .venv).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all setup deps ui-vendor test unit demo bench clean
all: test

deps:
	@bash .ci/install-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ui]'
	$(PY) -m compileall -q -x node_modules kvmrun   # bytecode now (PYTHONDONTWRITEBYTECODE)
	touch $(STAMP)

ui-vendor:
	@bash .ci/build-ui

setup: deps ui-vendor $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

demo: setup
	$(PY) tests/guest/demo.py

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache kvmrun/ui/node_modules kvmrun/ui/static/vendor build
