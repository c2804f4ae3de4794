#!/usr/bin/env bash
# The GPU half of docs/BENCHMARKS.md, in one call on a CUDA machine (made for one H200).
#
# Needs only python3 with torch + torchvision (+ numpy), run from anywhere; sslab is used
# from this checkout (no install). Fashion-MNIST must be in data/fashion-mnist (an ignored
# folder; fill it with `mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
# data/fashion-mnist/` and carry it to the machine). Everything lands in $OUT (default ./outputs/gpu-bench):
#   nvidia-smi.txt      the card
#   log.txt             all output, tables included
# then, stage by stage in order of importance:
#   step.json           step benchmark, pretrain default batch sizes, width 1.0, bf16 + channels_last
#   study.json          the full Fashion-MNIST study timed phase by phase: params/full.yml (30 epochs,
#                       all 60k images, 7 budgets) with the issue's 3 seeds; UMAP only if umap-learn is there
#   probe-check.json    the study's probe sweep (63 cells) with heads trained together and one at a time:
#                       seconds of each and the top-1 differences (scripts/batched_probe_check.py)
#   (log.txt)           the streaming tests, tests/test_stream.py, CUDA cases included
#   stream.json         rotation pretraining at 96 px (553 MB of images: two chunks) streamed from pinned
#                       host memory against resident on the device: img/s of each, weight difference
#   step-big-batch.json rotation at the issue's orientation batch, 512 at 28/32 px (-96.json: 256 at 96 px)
#   compile.json        the step benchmark with torch.compile, rotation at 28 px
# Each stage runs under a share of BENCH_BUDGET_S (default 540 s), so the
# whole script fits one 10-minute device call; a stage cut short says so in log.txt.
# DEVICE (default cuda) and EXTRA (extra bench flags) exist to smoke-test the script on a CPU:
#   DEVICE=cpu EXTRA="--quick --steps 1 --warmup 0 --sizes 28" DATA_ROOT=none BENCH_BUDGET_S=200 scripts/gpu_bench.sh
# and, with a small study (STUDY_ARGS replaces the full study's flags) to try the probe check too:
#   DEVICE=cpu EXTRA="--quick --steps 1 --warmup 0 --sizes 28" DATA_ROOT=/usr/share/datasets/fashion-mnist \
#   STUDY_ARGS="--quick --budgets 1,4 --no-finetune --no-scratch --umap-points 0" \
#   STREAM_ARGS="--limit 1000 --image-size 28 --epochs 1" scripts/gpu_bench.sh
# Rehearsed that way on 2026-11-30 with the H200's versions (torch 2.11.0, torchvision 0.26.0, in
# a venv on the CPU): every stage exit 0.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu-bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DATA="${DATA_ROOT:-data/fashion-mnist}"
BUDGET="${BENCH_BUDGET_S:-540}"
DEVICE="${DEVICE:-cuda}"
EXTRA="${EXTRA:-}"
STUDY_ARGS="${STUDY_ARGS:---params params/full.yml --seeds 0,1,2}"
STREAM_ARGS="${STREAM_ARGS:-}"
# The study's runs stay outside $OUT (checkpoints are too big to send back); the probe check reads them.
STUDY_RUNS="${STUDY_RUNS:-$(mktemp -d /tmp/sslab-study-XXXXXX)}"
rmdir "$STUDY_RUNS" 2>/dev/null || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
: > "$LOG"
start=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME CAP_SECONDS COMMAND...: run with at most CAP seconds and never past the budget.
stage() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - (SECONDS - start) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    say "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
    return 0
  fi
  say "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if (( rc == 124 || rc == 130 )); then
    say "=== $name: STOPPED at its ${limit}s limit after $(( SECONDS - t0 ))s (phases finished so far are above)"
  else
    say "=== $name: exit $rc after $(( SECONDS - t0 ))s"
  fi
}

{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
say "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
"cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")' 2>&1 | tee -a "$LOG"

stage "step benchmark" 150 \
  "$PY" -m sslab bench --device $DEVICE $EXTRA --json "$OUT/step.json"
if [ -f "$DATA/train-images-idx3-ubyte.gz" ] || [ -f "$DATA/train-images-idx3-ubyte" ]; then
  stage "full study" 330 \
    "$PY" -m sslab bench --device "$DEVICE" --study $STUDY_ARGS --data-root "$DATA" \
      --no-probes-alone --out "$STUDY_RUNS" --json "$OUT/study.json"
  stage "probe sweep: heads trained together against one at a time (the study's runs)" 90 \
    bash -c "'$PY' scripts/batched_probe_check.py '$STUDY_RUNS'/runs/pretrain-* --device $DEVICE \
               --json '$OUT/probe-check.json'"
else
  say "=== full study: skipped, no Fashion-MNIST in $DATA (see the top of this script)"
fi
stage "streaming from pinned host memory (tests, CUDA included)" 60 \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_stream.py
if [ -f "$DATA/train-images-idx3-ubyte.gz" ] || [ -f "$DATA/train-images-idx3-ubyte" ]; then
  stage "pretraining on a streamed pool against a resident one" 90 \
    "$PY" scripts/stream_check.py --device "$DEVICE" --data-root "$DATA" $STREAM_ARGS --json "$OUT/stream.json"
fi
stage "rotation at the issue's batch sizes (28/32 px: 512, 96 px: 256)" 60 \
  bash -c "'$PY' -m sslab bench --device $DEVICE $EXTRA --methods rotation --sizes 28,32 --batch-size 512 \
             --json '$OUT/step-big-batch.json' &&
           '$PY' -m sslab bench --device $DEVICE $EXTRA --methods rotation --sizes 96 --batch-size 256 \
             --json '$OUT/step-big-batch-96.json'"
stage "torch.compile, rotation at 28 px" 150 \
  "$PY" -m sslab bench --device "$DEVICE" --methods rotation --sizes 28 --compile --steps 40 $EXTRA --json "$OUT/compile.json"
say "total: $(( SECONDS - start ))s"
