# Two commands set everything up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export CHEXFOUND_DATA ?= $(abspath ../shared/data)

.PHONY: venv demo demo-quick test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on the project machines this is a local CPU wheel (no CUDA download).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/chexfound demo --data $(CHEXFOUND_DATA) --out demo-out

demo-quick: $(STAMP)
	$(VENV)/bin/chexfound demo --quick --data $(CHEXFOUND_DATA) --out demo-out-quick

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-out demo-out-quick .pytest_cache
