# Two commands do all set-up on a fresh machine (README): `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run reference test test-fast lint clean-results notebooks

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

## make run: install if needed, then regenerate every table and figure on the embedded generated dataset
## into results/<profile>/ (git-ignored: a run never modifies tracked files)
run: $(STAMP)
	$(PY) run_all.py $(ARGS)

## make reference: regenerate the committed results/reference/<profile>/ (refuses on a dirty git tree)
reference: $(STAMP)
	$(PY) run_all.py --reference $(ARGS)

## make test: install if needed, then lint and run the whole test suite
test: $(STAMP)
	$(PY) -m ruff check mudenet_core notebooks tests run_all.py benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check mudenet_core notebooks tests run_all.py benchmarks

notebooks: $(STAMP)
	$(PY) -m jupytext --to ipynb notebooks/*.py

## make clean-results: delete the user runs (results/<profile>/); the committed reference results stay
clean-results:
	rm -rf results/smoke results/cpu results/paper
