# Two entry points for a fresh machine: `make run` (the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this torch is what CI and development machines use. A node with a CUDA or Jetson
# build of torch already installed in the venv keeps it: torch is only installed when missing.
TORCH_SPEC ?= torch==2.13.0
MODEL_DIR ?= models/tiny
DEMO_PROMPT ?= a red circle on a blue background
OUT_DIR ?= out

.PHONY: run test lint typecheck pytest install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(MODEL_DIR)/model_index.json: | $(VENV)/.installed
	$(BIN)/zimage-edge toy-model $(MODEL_DIR) --size tiny --seed 0

run: install $(MODEL_DIR)/model_index.json
	$(BIN)/zimage-edge generate --model $(MODEL_DIR) "$(DEMO_PROMPT)" \
		--width 256 --height 256 --seed 0 -o $(OUT_DIR)/demo.png

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) $(OUT_DIR) .pytest_cache .mypy_cache .ruff_cache
