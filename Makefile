# Two commands a newcomer runs (README): `make demo` and `make test`.
# Each makes the virtual environment first if it is missing or out of date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
DEMO_ARGS ?=

.PHONY: setup demo test lint format lock

setup: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pebr data synth --out $(DEMO_DIR)/train --n 2000 --seed 0
	$(BIN)/pebr data synth --out $(DEMO_DIR)/val --n 200 --seed 1
	$(BIN)/pebr fit --config configs/demo/sft.yaml \
		--data.init_args.train_manifest $(DEMO_DIR)/train/manifest.jsonl \
		--data.init_args.val_manifest $(DEMO_DIR)/val/manifest.jsonl $(DEMO_ARGS)

# pytest exits 5 when it collected no test; make treats that as a failure like any other.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt.new && mv constraints.txt.new constraints.txt
