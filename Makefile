# Both README targets (demo, test) make their own environment (.venv) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
# The runtime alone (pip install care-export: no PyTorch), as on an edge box.
RT_VENV ?= .venv-runtime
RT_PY := $(RT_VENV)/bin/python
# Tests that need only the runtime install; they also run in `make test`.
RUNTIME_TESTS := tests/runtime/test_runtime_install.py tests/runtime/test_runtime_isolation.py \
	tests/runtime/test_atomic.py tests/calibration/test_margins.py tests/calibration/test_gptq.py tests/care_export/test_cli.py

.PHONY: demo test lint test-runtime bench clean-env

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@

$(RT_VENV)/.installed: pyproject.toml
	python3 -m venv $(RT_VENV)
	$(RT_PY) -m pip install -q --upgrade pip
	$(RT_PY) -m pip install -q . pytest pytest-timeout
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

# ruff (lint and format), the import contracts (pyproject [tool.importlinter]) and mypy on runtime/.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test-runtime: $(RT_VENV)/.installed
	CARE_RUNTIME_ONLY=1 $(RT_PY) -m pytest -q -p no:cacheprovider $(RUNTIME_TESTS)

# The exporter benchmark on a random 301-task ViT-B/16 checkpoint (2.4 GB, made once).
bench: $(VENV)/.installed
	test -f bench-ckpt/manifest.json || $(VENV)/bin/care-export synth-ckpt -o bench-ckpt --init-cls 100 --increment 3 --tasks 301
	$(PY) benchmarks/bench_export.py --ckpt bench-ckpt

clean-env:
	rm -rf $(VENV) $(RT_VENV)
