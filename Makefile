# Two commands do everything: `make demo` and `make test`. Both install what they need, idempotently,
# into .venv (which also sees a torch already installed on the system, so a GPU build is kept).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A CPU build of torch where none is importable: a plain `torch` requirement pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-dev demo demo-full test lint slurm report clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)" \
	  || $(PIP) install -q torch --index-url "$(TORCH_CPU_INDEX)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Two runs at a time, one thread each: measured faster than one run on two threads for models this small.
DEMO_JOBS ?= 2

demo: install
	$(VENV)/bin/harness-train -m hydra/sweeper=harness sweep=demo hydra/launcher=joblib hydra.launcher.n_jobs=$(DEMO_JOBS)
	$(VENV)/bin/harness-report results/demo
	@echo "plots and tables: $(CURDIR)/results/demo/report/ (open index.html; PNGs: $$(cd results/demo/report && ls *.png | tr '\n' ' '))"

# Every family (81 runs, about 8 minutes on 2 cores), one run at a time.
demo-full: install
	$(VENV)/bin/harness-train -m hydra/sweeper=harness sweep=demo_full
	$(VENV)/bin/harness-report results/demo_full

report: install
	$(VENV)/bin/harness-report results/demo

# Starts a local single-node Slurm when we can (root, apt); the Slurm tests skip with a reason otherwise.
slurm:
	-bash scripts/slurm_up.sh

lint: install-dev
	$(PY) -m ruff check harness hydra_plugins tests benchmarks

# The C kernels build into the checkout's own cache here, so the suite never depends on a writable HOME.
test: install-dev slurm lint
	HARNESS_KERNEL_CACHE="$${HARNESS_KERNEL_CACHE:-$(CURDIR)/.cache/kernels}" $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) results/demo
