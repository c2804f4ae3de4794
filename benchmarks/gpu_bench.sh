#!/usr/bin/env bash
# The GPU half of docs/BENCHMARKS.md, in one call on a CUDA machine (made for one H200).
#
# Needs only python3 with torch + torchvision (+ numpy), run from anywhere; sslab is used
# from this checkout (no install). Fashion-MNIST must be in data/fashion-mnist (an ignored
# folder; fill it with `mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
# data/fashion-mnist/` and carry it to the machine). Everything lands in $OUT (default ./outputs/gpu-bench),
# at most 8 files (what the device tool brings back), stage by stage in this order:
#   log.txt             all output: nvidia-smi, versions, every table, the streaming tests
#   step.json           step benchmark, pretrain default batch sizes, width 1.0, bf16 + channels_last
#   step-big-batch.json rotation at large batches, 512 at 28/32 px (-96.json: 256 at 96 px)
#   (log.txt)           the streaming tests, tests/test_stream.py, CUDA cases included
#   study.json          the full Fashion-MNIST study timed phase by phase (bench --study's defaults: 30
#                       epochs on all 60k images, 7 budgets × 3 seeds, fine-tuning; UMAP only if
#                       umap-learn is there). Capped at 5 minutes: stopped there, it still writes the
#                       phases it finished and the one it was in ("stopped": true)
#   probe-check.json    the study's probe sweep (63 cells) with heads trained together and one at a time:
#                       seconds of each and the top-1 differences (benchmarks/batched_probe_check.py)
#   stream.json         rotation pretraining at 96 px (553 MB of images: two chunks) streamed from pinned
#                       host memory against resident on the device: img/s of each, weight difference
#   compile.json        the step benchmark with torch.compile, rotation at 28 px
# Each stage runs under its own cap and never past BENCH_BUDGET_S (default 540 s) in all, so the
# whole script fits one 10-minute device call; a stage cut short says so in log.txt. The device
# machine's copy of the tree has no .git: pass COMMIT=<sha> to name the commit in the log.
# DEVICE (default cuda) and EXTRA (extra bench flags) exist to smoke-test the script on a CPU:
#   DEVICE=cpu EXTRA="--quick --steps 1 --warmup 0 --sizes 28" DATA_ROOT=none BENCH_BUDGET_S=200 benchmarks/gpu_bench.sh
# and, with a small study (STUDY_ARGS replaces the full study's flags) to try the probe check too:
#   DEVICE=cpu EXTRA="--quick --steps 1 --warmup 0 --sizes 28" DATA_ROOT=/usr/share/datasets/fashion-mnist \
#   STUDY_ARGS="--quick --budgets 1,4 --no-finetune --no-scratch --umap-points 0" \
#   STREAM_ARGS="--limit 1000 --image-size 28 --epochs 1" benchmarks/gpu_bench.sh
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
STUDY_ARGS="${STUDY_ARGS:-}"
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

say "date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
{ nvidia-smi || true; } 2>&1 | tee -a "$LOG"
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
"cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")' 2>&1 | tee -a "$LOG"
have_data() { [ -f "$DATA/train-images-idx3-ubyte.gz" ] || [ -f "$DATA/train-images-idx3-ubyte" ]; }
# Tests that load Fashion-MNIST without a data root look here too (and never try a download).
if have_data; then export SSLAB_DATA="$(cd "$DATA" && pwd)"; fi

# The short stages first, so a long study cannot crowd them out; then the study with a 5-minute
# cap (the GPU target for the full study: past it the target is missed, and the stopped phase
# says where the time went); then what only needs the study's runs or is least important.
stage "step benchmark" 120 \
  "$PY" -m sslab bench --device $DEVICE $EXTRA --json "$OUT/step.json"
stage "rotation at large batches (28/32 px: 512, 96 px: 256)" 60 \
  bash -c "'$PY' -m sslab bench --device $DEVICE $EXTRA --methods rotation --sizes 28,32 --batch-size 512 \
             --json '$OUT/step-big-batch.json' &&
           '$PY' -m sslab bench --device $DEVICE $EXTRA --methods rotation --sizes 96 --batch-size 256 \
             --json '$OUT/step-big-batch-96.json'"
stage "streaming from pinned host memory (tests, CUDA included)" 45 \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_stream.py
if have_data; then
  stage "full study" 300 \
    "$PY" -m sslab bench --device "$DEVICE" --study $STUDY_ARGS --data-root "$DATA" \
      --no-probes-alone --out "$STUDY_RUNS" --json "$OUT/study.json"
  # Only complete runs: a study stopped at its cap can leave one unfinished.
  complete_runs=$(for run in "$STUDY_RUNS"/runs/pretrain-*; do [ -f "$run/complete.json" ] && echo "$run"; done)
  if [ -n "$complete_runs" ]; then
    stage "probe sweep: heads trained together against one at a time (the study's runs)" 60 \
      "$PY" benchmarks/batched_probe_check.py $complete_runs --device $DEVICE --json "$OUT/probe-check.json"
  else
    say "=== probe sweep check: skipped, the study left no complete pretraining run"
  fi
  stage "pretraining on a streamed pool against a resident one" 60 \
    "$PY" benchmarks/stream_check.py --device "$DEVICE" --data-root "$DATA" $STREAM_ARGS --json "$OUT/stream.json"
else
  say "=== full study, probe check and stream check: skipped, no Fashion-MNIST in $DATA (see the top of this script)"
fi
stage "torch.compile, rotation at 28 px" 120 \
  "$PY" -m sslab bench --device "$DEVICE" --methods rotation --sizes 28 --compile --steps 40 $EXTRA --json "$OUT/compile.json"
say "total: $(( SECONDS - start ))s"
