# Two commands on a fresh machine:  `make run` (set up, then train locally through a Ray head and
# `ray job submit`) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin
# The CPU build of torch; on a GPU machine use `make setup TORCH=torch` (PyPI's CUDA build).
TORCH  ?= torch==2.13.0
# SST-2 from ../shared when a local copy is there, else from the Hugging Face Hub.
DATA   ?= $(if $(wildcard ../shared/data/sst2/train.parquet),$(abspath ../shared/data/sst2),nyu-mll/glue)
RUNS   ?= $(abspath runs)
ARGS   ?=
export PATH := $(BIN):$(PATH)

.PHONY: setup run train-local test lint clean gpu-kit

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,offline]"
	touch $@

# A Ray head of this run's own (free ports, a token of its own unless ~/.ray/auth_token exists), the training
# job submitted to it, then that head stopped, and no other Ray on the machine; its log is runs/ray-head.log.
run: setup
	python -m raysst.local_head --log "$(RUNS)/ray-head.log" -- \
		ray job submit --working-dir . -- python jobs/train.py --config configs/local.yaml \
		--data "$(DATA)" --storage-path "$(RUNS)" $(ARGS)

# The same job without a Ray head: `python jobs/train.py` starts a local Ray itself.
train-local: setup
	python jobs/train.py --config configs/local.yaml --data "$(DATA)" --storage-path "$(RUNS)" $(ARGS)

test: setup
	python -m pytest -q

# .gpu-kit/ (ignored): what bench/gpu_check.py needs on a lent GPU machine that its image lacks, at most 60 MiB;
# then the device tool's `run` arguments for it (README, "GPU check").
gpu-kit: setup
	python bench/gpu_kit.py --out .gpu-kit
	python bench/gpu_check.py --kit .gpu-kit --print-command

lint: setup
	ruff check raysst jobs tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
