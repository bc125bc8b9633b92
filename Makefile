# safegate: one command per job. Each target sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first and pinned: on these machines this picks the CPU build. Elsewhere,
# set TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only install.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
# Every dependency's exact version from the last green `make test`; `make lock` refreshes it.
CONSTRAINTS := constraints.txt
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export LITELLM_LOCAL_MODEL_COST_MAP ?= True
export TOKENIZERS_PARALLELISM ?= false

.PHONY: lock install run dashboard browser test lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "safegate needs Python 3.11+"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# Refresh constraints.txt: resolve the newest releases in a scratch venv and pin them.
# Run `make test` afterwards and commit constraints.txt only when it passes.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ echo "# Exact versions of a green run; made by 'make lock' on $$(date -u +%F). torch is"; \
	  echo "# pinned by TORCH_SPEC in the Makefile (a CPU or CUDA build per machine)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton)'; \
	} > $(CONSTRAINTS)
	rm -rf .lock-venv

# First start: trains and deploys the offline demo model (about a minute on 2 cores).
run: install
	$(BIN)/safegate finetune demo --if-missing
	$(BIN)/safegate serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy gateway finetune safegate evals dashboard

# The dashboard's browser test drives Debian's chromium headless; install it when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
	  echo "chromium/chromium-driver missing, not installable here: the browser test will say so"

pytest: install browser
	$(BIN)/python -m pytest

test: lint typecheck pytest

# The dashboard on http://127.0.0.1:8501, over the same SAFEGATE_HOME as `make run`.
dashboard: install
	$(BIN)/safegate dashboard

bench: install
	$(BIN)/python bench/engine_latency.py
	$(BIN)/python bench/engine_accuracy.py

clean:
	rm -rf $(VENV) build dist *.egg-info
