# Two entry points: `make demo` (the main job) and `make test` (the whole test suite).
# Both create or reuse the virtual environment .venv inside the repository.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := demo-output

.PHONY: demo test benchmark clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable ".[dev]"
	$(BIN)/python -c "import torch, torchvision, opacus, flwr, pydicom; print('fedmed environment ready: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/fedmed-simulate simulations/default.toml --mode all --out $(DEMO)

test: $(INSTALLED)
	$(BIN)/python -m pytest

benchmark: $(INSTALLED)
	$(BIN)/python benchmarks/dicom_ingest.py

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
