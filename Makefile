# The two commands a new user runs: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench preview clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

# the main job; it replaces the previous main-job run in $(RUN)
RUN ?= runs/synthetic_hps_resnet18
train: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/mtv-train configs/synthetic/hps_resnet18_128x160.yaml output_dir=$(RUN) --overwrite

# one BLAS/OpenMP thread per process: the suite runs several processes on 2 cores, and waiting
# OpenMP threads slow small tensors down by orders of magnitude there
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mtvision tools tests benchmarks datasets

preview: $(STAMP)
	$(BIN)/mtv-make-synthetic --out runs/synthetic_preview --num 16 --height 128 --width 160

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_synthetic.py

clean:
	rm -rf $(VENV) runs build *.egg-info
