# The two quick-start commands:  `make pipeline`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup pipeline test test-fast mutation app clean

$(BIN)/activate: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/activate

setup: $(BIN)/activate  ## create .venv with the pinned dependencies

pipeline: setup  ## set up, then rebuild the model from the raw images (dvc repro)
	. $(BIN)/activate && dvc repro

test: setup  ## set up, then run the whole test suite (browser tests need Debian's chromium)
	@command -v chromium >/dev/null || echo "note: chromium not installed; browser tests will be skipped (apt-get install chromium)"
	. $(BIN)/activate && python -m pytest -q

test-fast: setup  ## everything but the slow end-to-end tests
	. $(BIN)/activate && python -m pytest -q -m "not slow"

mutation: setup  ## mutation testing of the pure-Python core (mutmut, ~5 min on 2 cores; not in CI): kill rate per module
	. $(BIN)/activate && nice -n 10 python bench/mutation.py

app: setup  ## serve the trained model at http://127.0.0.1:8000 (settings: gunicorn.conf.py, .env)
	. $(BIN)/activate && gunicorn -c gunicorn.conf.py app:app

clean:
	rm -rf $(VENV)
