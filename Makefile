# Set-up and entry points. `make demo` and `make test` each create .venv on first use.
# Interpreter: python3.11 if present, else python3 (any >= 3.10); PYTHON=/path/to/python overrides.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The exact versions CI tested (pip constraints; torch, triton and CUDA libraries are left to your torch build).
CONSTRAINTS := constraints.txt

.PHONY: install demo test lint clean constraints gpu-kit

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH (set PYTHON=/path/to/python3.x, >= 3.10)"; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "error: $(PYTHON) is Python < 3.10; set PYTHON=/path/to/python3.x (>= 3.10)"; exit 2; }
	@echo "using $(PYTHON) ($$($(PYTHON) --version 2>&1))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first, so the project's torch range is already satisfied (no CUDA wheels on CPU).
	# On a GPU machine, install your CUDA torch first, then `pip install -e ".[dev]" -c constraints.txt`.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]" -c $(CONSTRAINTS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) run.py

# Two pytest-xdist workers (one per core of a 2-core CI machine; about 10 min instead of 23). TEST_WORKERS=0
# runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# What the lent GPU machine lacks (wheels for Python 3.12 + SmolLM2's tokenizer files) into .gpu-kit/ (git-ignored),
# carried by the device tool for benchmarks/gpu_suite.py (benchmarks/RESULTS.md has the exact device call).
gpu-kit: $(STAMP)
	$(PY) benchmarks/gpu_kit.py --out .gpu-kit

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Refresh the pins: resolve the newest versions pyproject.toml allows in a scratch venv and rewrite
# constraints.txt; then `make test` (which reinstalls .venv from the new pins) must pass before you commit.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q --upgrade pip
	.venv-constraints/bin/python -m pip install -q torch==2.13.0
	.venv-constraints/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Exact versions tested by CI (make test installs them). Refresh: make constraints (see README)."; \
	  echo "# $$(.venv-constraints/bin/python --version), $$(date -u +%Y-%m-%d). Left to your torch build: torch, triton, nvidia-*."; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+)=='; \
	} > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) .venv-constraints artifacts logs .pytest_cache .gpu-kit
