# `make demo` (the main job), `make test` (the whole test suite), `make test-fast` and `make lint`.
# Each creates or reuses the virtual environment .venv inside the repository.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := demo-output

.PHONY: demo test test-fast lint benchmark clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable ".[dev]"
	$(BIN)/python -c "import torch, torchvision, opacus, flwr, pydicom; print('fedmed environment ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/fedmed-simulate simulations/default.toml --mode all --out $(DEMO)

# Two workers (pytest-xdist): a module's tests stay on one worker, so each module's fixtures
# run once, and the shared simulation runs once for both (tests/conftest.py). Modules go out
# in collection order, which puts the longest first (tests/conftest.py: LONGEST_FIRST);
# xdist's own reordering, by number of tests, would leave the one-test model-quality run last.
test: $(INSTALLED)
	$(BIN)/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder

# The part without real Flower processes, simulations or long training: for the edit-test loop
# (two workers: 67 s here, one process 118 s).
test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -n 2 --dist loadscope -m "not e2e and not slow"

# Lint and format check (ruff) and type check (mypy), as configured in pyproject.toml.
lint: $(INSTALLED)
	$(BIN)/ruff check fedmed tests benchmarks
	$(BIN)/ruff format --check fedmed
	$(BIN)/mypy

benchmark: $(INSTALLED)
	$(BIN)/python benchmarks/dicom_ingest.py

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
