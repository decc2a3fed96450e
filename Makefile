# The two quick-start commands:  `make pipeline`  and  `make test`.
# GPU=1 (e.g. `make setup GPU=1`) installs TensorFlow's CUDA build instead of the CPU one (requirements/gpu.txt).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
GPU    ?=
FLAVOR := $(if $(filter 1 yes true,$(GPU)),gpu,dev)
OTHER  := $(if $(filter gpu,$(FLAVOR)),dev,gpu)
STAMP  := $(VENV)/.installed-$(FLAVOR)
UV     ?= $(BIN)/uv
# Test workers (pytest-xdist): one per core plus one, single-threaded each (tests/conftest.py says why).
WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
# The locks resolve for Linux and CPython 3.11.5+ (the oldest 3.11 every pinned package supports).
UV_COMPILE := $(UV) pip compile pyproject.toml --python-version 3.11.5 --python-platform linux --quiet \
              --custom-compile-command "make lock"

.DEFAULT_GOAL := setup
.PHONY: setup lock pipeline test test-fast mutation app clean

# The venv holds one lock: everything (requirements/dev.txt) or the same with CUDA TensorFlow (requirements/gpu.txt).
# Switching between the two starts a new venv: both TensorFlow builds install the same `tensorflow` package.
$(STAMP): requirements/$(FLAVOR).txt pyproject.toml
	@if [ -e $(VENV)/.installed-$(OTHER) ]; then echo "switching to requirements/$(FLAVOR).txt: new $(VENV)"; rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/$(FLAVOR).txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)  ## create .venv with the pinned dependencies (GPU=1: TensorFlow's CUDA build)

# Regenerate the locks from pyproject.toml's extras. Pins already in requirements/dev.txt are kept (uv prefers
# an output file's versions) and every other lock is constrained to them, so the locks agree and a rerun changes
# nothing (an unchanged lock keeps its file, so `make setup` does not rerun). Upgrades are deliberate:
# make lock UPGRADE="--upgrade-package keras" (or UPGRADE=--upgrade for all).
lock: | $(STAMP)  ## recompile requirements/*.txt (uv pip compile; the dev venv has uv)
	@set -e; \
	keep_if_same() { if cmp -s $$1.new $$1; then rm $$1.new; else mv $$1.new $$1; echo "updated $$1"; fi; }; \
	compile() { out=$$1; shift; cp $$out $$out.new 2>/dev/null || true; \
	  $(UV_COMPILE) "$$@" -o $$out.new; keep_if_same $$out; }; \
	compile requirements/dev.txt $(UPGRADE) --extra dev; \
	compile requirements/serving.txt --extra cpu --extra serving -c requirements/dev.txt; \
	compile requirements/pipeline.txt --extra cpu --extra pipeline -c requirements/dev.txt; \
	{ echo "# The GPU locks' TensorFlow: the release of tensorflow-cpu in dev.txt (written by make lock)"; \
	  sed -n 's/^tensorflow-cpu==/tensorflow==/p' requirements/dev.txt; } > requirements/tensorflow-gpu.txt.new; \
	keep_if_same requirements/tensorflow-gpu.txt; \
	compile requirements/gpu.txt --extra gpu --extra serving --extra pipeline --extra test --extra dev-tools \
	  -c requirements/dev.txt -c requirements/tensorflow-gpu.txt; \
	compile requirements/serving-gpu.txt --extra gpu --extra serving -c requirements/dev.txt \
	  -c requirements/tensorflow-gpu.txt; \
	echo "requirements/*.txt are up to date with pyproject.toml"

pipeline: setup  ## set up, then rebuild the model from the raw images (dvc repro)
	. $(BIN)/activate && dvc repro

test: setup  ## set up, then run the whole test suite (browser tests need Debian's chromium)
	@command -v chromium >/dev/null || echo "note: chromium not installed; browser tests will be skipped (apt-get install chromium)"
	. $(BIN)/activate && python -m pytest -q -n $(WORKERS) --dist worksteal

test-fast: setup  ## everything but the slow end-to-end tests, on every core (pytest-xdist)
	. $(BIN)/activate && python -m pytest -q -m "not slow" -n $(WORKERS) --dist worksteal

mutation: setup  ## mutation testing of the pure-Python core (mutmut, ~5 min on 2 cores; not in CI): kill rate per module
	. $(BIN)/activate && nice -n 10 python bench/mutation.py

app: setup  ## serve the trained model at http://127.0.0.1:8000 (settings: gunicorn.conf.py, .env)
	. $(BIN)/activate && gunicorn -c gunicorn.conf.py app:app

clean:
	rm -rf $(VENV)
