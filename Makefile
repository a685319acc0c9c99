# Both targets make their own environment (.venv) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean-env

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The exporter benchmark on a random 301-task ViT-B/16 checkpoint (2.4 GB, made once).
bench: $(VENV)/.installed
	test -f bench-ckpt/manifest.json || $(VENV)/bin/care-export synth-ckpt -o bench-ckpt --init-cls 100 --increment 3 --tasks 301
	$(PY) benchmarks/bench_export.py --ckpt bench-ckpt

clean-env:
	rm -rf $(VENV)
