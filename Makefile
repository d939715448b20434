# Two commands set everything up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the shared data beside the checkout, or the packed copy a device machine gets (../shared/tools/pack-device-data.sh)
export CHEXFOUND_DATA ?= $(abspath $(if $(wildcard .device-data),.device-data,../shared/data))

.PHONY: venv demo demo-quick test test-fast bench clean gpu-proof

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

# The unit tests alone (under a minute on 2 cores): no test that reads the shared data, none marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not data" tests

# The GPU proof (docs/pretraining.md): runs from this source tree with no install and no venv (torch >= 2.11,
# numpy, scikit-learn, scipy, pandas, safetensors, pyyaml, Pillow, tqdm); OUT receives <= 8 files of <= 16 MiB.
#   make gpu-proof OUT=dir [ARGS='--time-budget 420 key=value ...']
gpu-proof:
	@test -n "$(OUT)" || { echo "usage: make gpu-proof OUT=dir [ARGS='key=value ...']"; exit 2; }
	PYTHONPATH=$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m chexfound pretrain \
		--config proof_vits16_224 --proof-out $(OUT) $(ARGS)

# Every bench runs, whatever an earlier one did; the failures are listed at the end (and fail the target).
bench: $(STAMP)
	@failed=""; for b in bench/[!_]*.py; do echo "== $$b"; PYTHONPATH=src $(PY) $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "benches that failed:$$failed"; exit 1; fi; echo "every bench ran"

clean:
	rm -rf $(VENV) demo-out demo-out-quick .pytest_cache
