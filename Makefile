# Two commands for a newcomer: `make bench` and `make test`. Each sets up .venv first.
#
# On a machine whose python3 already has a CUDA torch and the other dependencies (the lent GPU machine,
# which has no network), the venv reuses them through --system-site-packages and installs nothing from
# the network. Elsewhere it installs the CPU torch wheel and everything else from the package index; torch
# is named again with the dev extra so that pip picks the torchvision built for it instead of replacing it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
OUT    ?= out
REPORTS ?= reports
STORAGE ?= .benchmarks

.PHONY: setup test bench bench-gpu publish lint clean

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
		$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"; \
	fi
	@touch $@

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests --durations=10

# The quick profile on the CPU, the full one where a GPU is present (docs/matrix.md lists the options and
# PERFKIT_* variables that narrow it). The JSON-lines file starts afresh with each run. The
# report goes to $(OUT)/reports and is compared with the committed one in $(REPORTS); nothing tracked changes.
# Without a GPU the Triton kernels run in the interpreter: their cells are gate-checked, not timed.
# Each run is also kept in pytest-benchmark's storage ($(STORAGE), ignored by git) for `perfkit history`.
bench: $(STAMP)
	@mkdir -p $(OUT) && rm -f $(OUT)/results.jsonl
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(PY) -m pytest benchmarks/ -q --benchmark-json $(OUT)/bench.json --perfkit-jsonl $(OUT)/results.jsonl \
		--benchmark-autosave --benchmark-storage=file://$(STORAGE)
	$(PY) -m perfkit report $(OUT)/bench.json -o $(OUT)/reports --baseline $(REPORTS)
	@echo "(a committed report was timed on another day: its comparison shows the machine's mood as well as the code's;"
	@echo " for a verdict on a change, time both commits interleaved: perfkit ab BASE HEAD, docs/ci.md)"

# On purpose: make the last `make bench` run the committed report (and baseline) of its device.
publish: $(STAMP)
	@test -f $(OUT)/bench.json || { echo "no $(OUT)/bench.json: run make bench first"; exit 2; }
	$(PY) -m perfkit report $(OUT)/bench.json --baseline $(REPORTS) --publish

# One call on one H100/H200 (docs/scale-out.md; perfkit/matrix/plan.py estimates 6.5 minutes, the plan prints
# first): the gpu-smoke profile, the device's ceilings copied where the report reads them, the report, and one
# archive of it all to carry off the machine. The report is built even when a cell's test failed.
bench-gpu: $(STAMP)
	@mkdir -p $(OUT) && rm -rf $(OUT)/results.jsonl $(OUT)/ceilings $(OUT)/gpu-smoke.tar.gz
	-PERFKIT_PROFILE=gpu-smoke $(PY) -m pytest benchmarks/ -q --benchmark-json $(OUT)/bench.json \
		--perfkit-jsonl $(OUT)/results.jsonl
	@if [ -d $(OUT)/ceilings ]; then mkdir -p $(REPORTS) && cp -r $(OUT)/ceilings/. $(REPORTS)/; fi
	$(PY) -m perfkit report $(OUT)/bench.json -o $(REPORTS)
	tar -czf $(OUT)/gpu-smoke.tar.gz $(OUT)/bench.json $(OUT)/results.jsonl $(REPORTS) \
		$$([ -d $(OUT)/ceilings ] && echo $(OUT)/ceilings)
	@echo "perfkit: everything is in $(OUT)/gpu-smoke.tar.gz"

lint: $(STAMP)
	$(VENV)/bin/ruff check perfkit kernels benchmarks tests

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .benchmarks
