#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, in stages that each fit one device-tool call:
#   bash scripts/gpu_session.sh STAGE   (from the repository root; results under $OUT)
# tests: the GPU tests of kernels, parity, graphs and the communicator (log in $OUT/tests.log)
# ops: the GPU tests of the Triton kernels alone (about a minute), e.g. before an engine benchmark
# kernels: the decode GEMV benchmark with its config sweep, the GEMV and graph GPU tests, the doctor
# fleet: the fleet's GPU tests (placement, Ray, stale processes, teardown, colocation)
# check: the doctor, then the all-reduce benchmark on 4 GPUs
#        (GRIDS=64x256,... times other launch grids of the custom kernels too)
# engine: the 8b-shape engine benchmark, TP=2, then TP=1 with the transformers baseline (HF=0 skips it)
# pdl: the engine benchmark at TP=1 and 2 (full graphs, no baseline) with programmatic dependent launch
#      on, then off (TPFLEET_PDL=0), on one machine
# fused: the fused all-reduce's GPU tests, then the engine benchmark at TP=2 with it on and off
#        (TPFLEET_FUSED_AR), and at TP=1 (piecewise), on one machine
# warm: cold and warm starts of a TP=2 engine, and a second warm-up run, on emptied caches
set -uo pipefail
cd "$(dirname "$0")/.."
# Ray's wheel is large to install: only the fleet stage needs it
SKIP_WHEELS=${SKIP_WHEELS:-$([ "${1:-}" = fleet ] && echo '^$' || echo ray)} source scripts/gpu_setup.sh || exit 1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
MODEL=/tmp/tpfleet-m8b
GPUS=$(nvidia-smi -L | wc -l)
log() { echo "=== $(date +%T) $*"; }

make_model() {
  [ -f "$MODEL/config.json" ] || python3 -m tpfleet make-model --preset 8b-shape --out "$MODEL" --device cuda
}

case "$1" in
  tests)
    log "GPU tests"
    timeout 560 python3 -m pytest -q -rf -x -m gpu tests/test_triton_ops.py tests/test_gemv.py tests/test_attention.py \
      tests/test_model_parity.py tests/test_graphs_gpu.py tests/test_comm_gpu.py > "$OUT/tests.log" 2>&1
    echo "pytest exit $?"; tail -5 "$OUT/tests.log"
    ;;
  ops)
    log "Triton kernel GPU tests"
    timeout 240 python3 -m pytest -q -rf -x -m gpu tests/test_triton_ops.py tests/test_attention.py tests/test_gemv.py \
      > "$OUT/ops.log" 2>&1
    echo "pytest exit $?"; tail -5 "$OUT/ops.log"
    ;;
  kernels)
    log "GEMV benchmark"; timeout 300 python3 -m tpfleet bench gemv --sweep --out "$OUT"
    log "GEMV and graph tests"
    timeout 240 python3 -m pytest -q -rf -m gpu tests/test_gemv.py tests/test_graphs_gpu.py > "$OUT/tests.log" 2>&1
    echo "pytest exit $?"; tail -5 "$OUT/tests.log"
    log "doctor"; timeout 60 python3 -m tpfleet doctor > "$OUT/doctor.txt" 2>&1; echo "exit $?"; cat "$OUT/doctor.txt"
    ;;
  fleet)
    log "fleet GPU tests"
    timeout 500 python3 -m pytest -q -rf -m gpu tests/test_fleet_gpu.py > "$OUT/fleet.log" 2>&1
    echo "pytest exit $?"; tail -8 "$OUT/fleet.log"
    ;;
  check)
    log "doctor"; python3 -m tpfleet doctor > "$OUT/doctor.txt" 2>&1; echo "exit $?"; tail -30 "$OUT/doctor.txt"
    python3 -m tpfleet doctor --json > "$OUT/doctor.json" 2>/dev/null
    if [ "$GPUS" -ge 4 ]; then
      log "all-reduce, 4 GPUs"
      timeout 200 python3 -m tpfleet bench allreduce --nproc 4 ${GRIDS:+--grids $GRIDS} --out "$OUT" | tail -32
    fi
    ;;
  engine)
    make_model
    log "engine TP=2"
    timeout 200 python3 -m tpfleet bench engine --model "$MODEL" --device cuda --tp 2 --graph-mode full --no-hf \
      --out "$OUT"
    log "engine TP=1, then transformers unless HF=0 (the JSON is written before the baseline starts)"
    timeout 360 python3 -m tpfleet bench engine --model "$MODEL" --device cuda --tp 1 --graph-mode piecewise \
      --out "$OUT" $([ "${HF:-1}" = 0 ] && echo --no-hf)
    ;;
  pdl)
    make_model
    for tp in 1 2; do for pdl in 1 0; do
      log "engine TP=$tp, TPFLEET_PDL=$pdl"
      TPFLEET_PDL=$pdl timeout 140 python3 -m tpfleet bench engine --model "$MODEL" --device cuda --tp $tp \
        --graph-mode full --no-hf --out "$OUT/tp${tp}_pdl$pdl" 2> "$OUT/tp${tp}_pdl$pdl.log"
    done; done
    ;;
  fused)
    make_model
    log "fused all-reduce GPU tests"
    timeout 240 python3 -m pytest -q -rf -m gpu tests/test_comm_gpu.py tests/test_model_parity.py -k fused \
      > "$OUT/fused_tests.log" 2>&1
    echo "pytest exit $?"; tail -5 "$OUT/fused_tests.log"
    for fused in 1 0; do
      log "engine TP=2, TPFLEET_FUSED_AR=$fused"
      TPFLEET_FUSED_AR=$fused timeout 140 python3 -m tpfleet bench engine --model "$MODEL" --device cuda --tp 2 \
        --graph-mode full --no-hf --out "$OUT/tp2_fused$fused" 2> "$OUT/tp2_fused$fused.log"
    done
    log "engine TP=1"
    timeout 140 python3 -m tpfleet bench engine --model "$MODEL" --device cuda --tp 1 --graph-mode piecewise \
      --no-hf --out "$OUT/tp1" 2> "$OUT/tp1.log"
    ;;
  warm)
    make_model
    empty_caches() {  # tpfleet's and Triton's, so that "cold" means cold
      export TPFLEET_CACHE_DIR=$(mktemp -d)
      export TRITON_CACHE_DIR=$TPFLEET_CACHE_DIR/triton
    }
    start() {
      python3 -c "from tpfleet.config import EngineConfig; from tpfleet.engine.llm_engine import LLMEngine; \
LLMEngine(EngineConfig(model='$MODEL', tp_size=2, device='cuda', graph_mode='full')).shutdown()" 2>&1 \
        | grep "phase: jit_caches"
    }
    empty_caches
    log "cold engine start, TP=2"; time start
    log "warm engine start, TP=2"; time start
    empty_caches
    log "warmup, cold caches"
    timeout 300 python3 -m tpfleet warmup --model "$MODEL" --tp 1,2 --graph-mode full | tail -4
    log "warmup, second run"
    time python3 -m tpfleet warmup --model "$MODEL" --tp 1,2 --graph-mode full | tail -4
    ;;
  compare)
    # One-GPU check of a tree against a baseline tree (both package copies, e.g. `git archive` exports):
    # the GPU tests of TREE, then the TP=1 engine benchmark of BASE, TREE, BASE, TREE in turn.
    make_model
    log "GPU tests of ${TREE:?set TREE}"
    (cd "$TREE" && PYTHONPATH=/tmp/site:$PWD timeout 240 python3 -m pytest -q -rf -x -m gpu -p no:cacheprovider \
      tests/test_triton_ops.py tests/test_gemv.py tests/test_attention.py tests/test_greedy.py \
      tests/test_model_parity.py tests/test_graphs_gpu.py tests/test_moe.py -k "not interpreter") \
      > "$OUT/tests.log" 2>&1
    echo "pytest exit $?"; tail -4 "$OUT/tests.log"
    for run in 1 2; do for tree in "${BASE:?set BASE}" "$TREE"; do
      log "engine TP=1 ($tree, run $run)"
      PYTHONPATH=/tmp/site:$PWD/$tree timeout 150 python3 -m tpfleet bench engine --model "$MODEL" --device cuda \
        --tp 1 --graph-mode piecewise --no-hf --num-seqs 128 --out "$OUT/$(basename $tree)_$run" 2>/dev/null \
        | grep -E "^ +(1|8|64|256) |measured|^offline|^mixed"
    done; done
    ;;
  *) echo "usage: $0 tests|ops|kernels|check|engine|pdl|warm|fleet|compare" >&2; exit 2 ;;
esac
