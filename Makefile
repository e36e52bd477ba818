# cdm: Compartmentalized Diffusion Models. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
ART ?= artifacts
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0

.PHONY: install test test-slow test-all lint format demo data-fashion bench-train bench-compose clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install cdm with its pinned stack (editable)

data-fashion:  ## Fashion-MNIST from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
	@test -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz -o -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte || \
	  { $(if $(shell command -v sudo),sudo,) apt-get install -y -q dataset-fashion-mnist || { $(if $(shell command -v sudo),sudo,) apt-get update -q && $(if $(shell command -v sudo),sudo,) apt-get install -y -q dataset-fashion-mnist; }; }

test: install data-fashion  ## fast tests (excludes slow and gpu)
	$(PY) -m pytest -q

test-slow: install data-fashion  ## slow tests only
	$(PY) -m pytest -q -m slow

test-all: install data-fashion  ## every CPU test
	$(PY) -m pytest -q -m 'not gpu'

lint: install
	$(VENV)/bin/ruff check cdm tests benchmarks
	$(VENV)/bin/ruff format --check cdm tests benchmarks

format: install
	$(VENV)/bin/ruff format cdm tests benchmarks
	$(VENV)/bin/ruff check --fix cdm tests benchmarks

demo: install  ## digits: safe backbone, 4 LoRA shards, router, composed samples; then every artifact with its card
	$(VENV)/bin/cdm-train experiment=digits_4split stage=backbone paths.artifacts=$(ART)
	$(VENV)/bin/cdm-train -m experiment=digits_4split stage=shard shard.index=0,1,2,3 paths.artifacts=$(ART) \
	  hydra/launcher=joblib hydra.launcher.n_jobs=2 trainer.enable_progress_bar=false
	$(VENV)/bin/cdm-train experiment=digits_4split stage=router paths.artifacts=$(ART) trainer.enable_progress_bar=false
	$(VENV)/bin/cdm-sample experiment=digits_4split composition=classifier paths.artifacts=$(ART)
	$(VENV)/bin/cdm-sample experiment=digits_4split composition=average paths.artifacts=$(ART)
	$(VENV)/bin/cdm-list --root $(ART) --experiment digits_4split --cards

bench-train: install  ## our shard training step vs a bare PyTorch loop (writes docs/benchmarks/*.json)
	$(PY) benchmarks/train_step.py

bench-compose: install  ## one composed denoising step for 1-8 shards vs one adapter (writes docs/benchmarks/*.json)
	$(PY) benchmarks/compose_step.py

clean:
	rm -rf outputs multirun
