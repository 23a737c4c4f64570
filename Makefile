# Two entry points for a fresh machine: `make run` (the local fleet demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this torch is what CI and development machines use. A node with a CUDA or Jetson
# build of torch already installed in the venv keeps it: torch is only installed when missing.
TORCH_SPEC ?= torch==2.13.0
# The demo's model: empty means the shapes model shipped in the package (trained, 64x64); set MODEL to
# a diffusers directory or a cached Hugging Face id (e.g. real Z-Image-Turbo weights) to quantize that.
MODEL ?=
OUT_DIR ?= out
# Tools whose pins clash with the project's get a venv of their own; tests/k3s finds them there.
TOOLS_VENV ?= .venv-tools
CHECKOV_SPEC ?= checkov>=3.2,<4

.PHONY: run test lint typecheck pytest install tools clean system system-test

# System packages (a C++ compiler; Chromium for the tests), installed when missing or named in one line.
system:
	@bash scripts/bootstrap.sh run

system-test:
	@bash scripts/bootstrap.sh test

$(BIN)/python: | system
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,k3s]"
	touch $@

# checkov for tests/k3s (~1 minute and ~300 MB the first time).
$(TOOLS_VENV)/.installed: | system
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q "$(CHECKOV_SPEC)"
	touch $@

tools: $(TOOLS_VENV)/.installed

install: system $(VENV)/.installed

run: install
	$(BIN)/zimage-edge demo $(if $(MODEL),--source "$(MODEL)") --out $(OUT_DIR)/demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install tools system-test
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(OUT_DIR) .pytest_cache .mypy_cache .ruff_cache
