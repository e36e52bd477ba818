#!/usr/bin/env bash
# The GPU measurements of issue 16, as few prepared calls of a lent GPU machine (docs/benchmarks.md).
#
# Here, once (downloads the wheels the GPU image lacks into .whl/, ignored by git; ~8 MB):
#     bash benchmarks/gpu_run.sh wheels
# There (the device tool runs this from the repo root, carry [".whl"]; results land in $OUT):
#     bash benchmarks/gpu_run.sh compose train table1 tests
# Parts: compose (goals 1-2, default limit 240 s), train (goal 3, 300 s), table1 (goal 4, 300 s),
# tests (the gpu tests of sampling, 150 s). Each limit can be set: COMPOSE_S, TRAIN_S, TABLE1_S,
# TESTS_S; TESTS picks test node ids; TRAIN_BATCH, TRAIN_MODE and TRAIN_NORMS vary the training run.
# Seen on the H200 on 2026-11-30 (docs/benchmarks.md): a machine starts in ~35 s; compose takes
# ~155 s before its profiles (two inductor compilations ~90 s), table1 ~120 s, the gpu tests
# ~45 s; train ~150-180 s at B = 512 or 1024 (two compilations of forward and backward, the
# timed rounds, the profile). Device time is 15 min a session, starts included, so two train
# runs fit one call:
#     bash benchmarks/gpu_run.sh train; TRAIN_NORMS=bf16 bash benchmarks/gpu_run.sh train
# Each part runs under its own timeout, so one that hangs costs only its own slice; a part that
# fails is logged and the next one still runs. The machine's torch is used as it is (its version
# is recorded in every JSON); only the packages it lacks travel as wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cdm-gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
# versions pinned in pyproject.toml; antlr4 (hydra's parser) has no wheel on PyPI, so it is built
WHEELS="diffusers==0.42.1 peft==0.21.2 hydra-core==1.3.8 omegaconf==2.3.1"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"

wheels() {
  local py=${PYTHON:-.venv/bin/python}
  rm -rf .whl && mkdir -p .whl
  # shellcheck disable=SC2086
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS -d .whl $WHEELS && $py -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
  ls -la .whl
}

setup() {  # on the GPU machine: the carried wheels on top of its own packages
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || return 1
  fi
  export PYTHONPATH=/tmp/site:$PWD
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
    date -u; } 2>&1 | tee "$OUT/env.txt"
}

part() {  # part NAME SECONDS COMMAND...: one timed slice, its output appended to $OUT/log.txt
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/log.txt"
  local start=$SECONDS
  # SIGINT first: table1_device.py then still writes the stages it timed; killed 15 s later
  timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
  echo "=== $name: rc ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
}

tests() {  # the gpu-marked tests of sampling: graphed steps and cdm-sample on CUDA against the CPU
  # shellcheck disable=SC2086  # TESTS: which tests (node ids), word-split on purpose
  part gpu-tests "${TESTS_S:-150}" python3 -m pytest -v -p no:cacheprovider -m gpu \
    ${TESTS:-tests/test_compose.py tests/test_sample_cli.py}
}

compose() {  # goals 1 and 2 at 8 shards, B = 16, base preset 32x32x3 bf16
  part compose "${COMPOSE_S:-240}" python3 benchmarks/compose_step.py --device cuda --precision bf16 \
    --preset base --resolution 32 --channels 3 --batch-size 16 --shards 8 --steps 25 --profile \
    --out "$OUT/compose_step-cuda.json"
}

train() {  # goal 3: compiled, channels-last, cuDNN autotuned, the host not synced per step
  # TRAIN_BATCH (512), TRAIN_MODE (torch.compile's mode: default, reduce-overhead, ...) and
  # TRAIN_NORMS (autocast: group_norm in fp32 as CUDA autocast runs it; bf16: the census's lever)
  # vary it; on the H200 (2026-11-30) compiling both paths and one round of ours took ~2 min
  # TRAIN_FLAGS: train_step.py's flags beyond these, named in the JSON's name; by default the
  # fastest measured (--layout-opt --pin-memory: 83 instead of 100 ms a step); TRAIN_FLAGS= for none
  local batch=${TRAIN_BATCH:-512} mode=${TRAIN_MODE:-default} norms=${TRAIN_NORMS:-autocast}
  local flags=${TRAIN_FLAGS---layout-opt --pin-memory} tag
  tag=$(echo "$flags" | tr -d ' ' | sed 's/--/-/g')
  # the profile's kernel families beside the census's floors (made here in ~15 s if not committed)
  local suffix="" census
  [ "$norms" = autocast ] || suffix="-$norms-norms"
  census=docs/benchmarks/train_census-base-b$batch$suffix.json
  if [ ! -f "$census" ]; then
    census=$OUT/train_census-base-b$batch$suffix.json
    part census 60 python3 benchmarks/train_census.py --batch-size "$batch" --norm-dtype "$norms" --out "$census"
  fi
  # shellcheck disable=SC2086  # flags: word-split on purpose
  part train "${TRAIN_S:-300}" python3 benchmarks/train_step.py --device cuda --precision bf16 \
    --preset base --resolution 32 --channels 3 --batch-size "$batch" --compile --compile-mode "$mode" \
    --channels-last --cudnn-benchmark --unsynced --rounds 2 --steps 20 --profile --peak-tflops 790 \
    --norm-dtype "$norms" --census "$census" $flags --out "$OUT/train_step-cuda-b$batch-$mode-$norms$tag.json"
}

table1() {  # goal 4: the same config as the CPU run quoted in docs/benchmarks.md
  part table1 "${TABLE1_S:-300}" python3 benchmarks/table1_device.py --device cuda --out "$OUT/table1-cuda.json" \
    --compare docs/benchmarks/table1-cpu.json
}

if [ $# -eq 0 ]; then
  echo "usage: bash benchmarks/gpu_run.sh wheels | [compose] [train] [table1] [tests]" >&2
  exit 2
fi
if [ "$1" = wheels ]; then
  wheels
  exit $?
fi
for p in "$@"; do
  case $p in
    compose | train | table1 | tests) ;;
    *) echo "unknown part '$p': use wheels, or compose, train, table1, tests" >&2; exit 2 ;;
  esac
done
setup || { echo "setup failed: are the wheels in .whl (bash benchmarks/gpu_run.sh wheels)?" >&2; exit 1; }
for p in "$@"; do
  $p
done
