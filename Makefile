# vlmforge: `make demo` and `make test` each set up .venv on first use (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmforge-installed
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test demo demo-model bench-learn bench-train clean

setup: $(STAMP)

# torch first (the pinned build), then the project with its dev extra.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The whole product on a local Ray: world -> curate -> stage 1 -> stage 2 -> serve -> questions.
demo: $(STAMP)
	$(VENV)/bin/vlm flow --output runs/demo

# The model library alone, in one process (no Ray): the learning demo of benchmarks/learn.py.
demo-model: $(STAMP)
	$(VENV)/bin/vlm demo --output runs/demo-model

bench-learn: $(STAMP)
	$(PY) benchmarks/learn.py

bench-train: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/train.py

clean:
	rm -rf runs .pytest_cache
