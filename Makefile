# Two commands for a newcomer: `make bench` and `make test`. Each sets up .venv first.
#
# On a machine whose python3 already has a CUDA torch and the other dependencies (the lent GPU machine,
# which has no network), the venv reuses them through --system-site-packages and installs nothing from
# the network. Elsewhere it installs the CPU torch wheel and everything else from the package index.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
OUT    ?= out
REPORTS ?= reports

.PHONY: setup test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import torch, triton, pandas, matplotlib, pytest_benchmark, setuptools; assert torch.cuda.is_available()" 2>/dev/null; then \
		echo "perfkit: reusing $(PYTHON)'s CUDA torch (no downloads)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV) && \
		$(PY) -m pip install -q --no-deps --no-build-isolation --no-index -e .; \
	else \
		echo "perfkit: creating $(VENV) with the CPU torch wheel"; \
		$(PYTHON) -m venv $(VENV) && \
		$(PY) -m pip install -q "$(TORCH)" && \
		$(PY) -m pip install -q -e ".[dev]"; \
	fi
	@touch $@

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The quick profile on the CPU, the full one where a GPU is present (perfkit/pytest_plugin.py lists the
# options and PERFKIT_* variables that narrow it). The JSON-lines file starts afresh with each run.
# Without a GPU the Triton kernels run in the interpreter: their cells are gate-checked, not timed.
bench: $(STAMP)
	@mkdir -p $(OUT) && rm -f $(OUT)/results.jsonl
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(PY) -m pytest benchmarks/ -q --benchmark-json $(OUT)/bench.json --perfkit-jsonl $(OUT)/results.jsonl
	$(PY) -m perfkit report $(OUT)/bench.json -o $(REPORTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check perfkit kernels benchmarks tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .benchmarks
