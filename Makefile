# brainuad: set-up, the study, and the tests. `make study` and `make test` are the
# README's two quick-start commands; both create .venv on first use.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CORES ?= all

.PHONY: setup study test test-all lint unit mutation clean-results

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: with it in place the other packages take it as it is
	# (a CPU build where one is provided locally, the same version's CUDA build elsewhere).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

## The whole study on the embedded synthetic cohort, on this machine's CPU (or GPU).
study: setup
	$(BIN)/snakemake --cores $(CORES)
	@echo "Tables: results/tables/main.md (all: results/tables/), figures: results/figures/"
	@cat results/tables/main.md

lint: setup
	$(BIN)/ruff check src tests workflow_scripts
	$(BIN)/ruff format --check src tests workflow_scripts
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint --configfile config/tiny.yaml

## Lint, then the tests CI runs, including a real tiny Snakemake study (not the `extended`
## end-to-end runs, which would take CI past its 30 minutes on 2 cores).
test: lint
	$(BIN)/pytest -q -m "not extended"

## Lint, then every test, the extended end-to-end runs included (about 10 minutes more).
test-all: lint
	$(BIN)/pytest -q

## Mutation testing (mutmut) of chosen modules against their own unit tests; writes the
## scores into docs/testing.md. A periodic check, not part of CI. Example:
##   make mutation MODULES="evaluation/postprocess.py slices/splits.py"
## After adding tests, run only the last run's survivors again (and rescore):
##   make mutation MODULES=slices/splits.py MUTATION_ARGS=--rerun-survivors
MODULES ?= evaluation/postprocess.py slices/splits.py preprocess/normalise.py preprocess/crop.py
mutation: setup
	$(BIN)/python -m pip install --quiet -e ".[test,mutation]"
	$(BIN)/python -m brainuad.bench.mutation $(MUTATION_ARGS) $(MODULES)

clean-results:
	rm -rf results logs benchmarks .snakemake .mutation
