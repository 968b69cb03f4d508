#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, in stages that each fit one device-tool call:
#   bash scripts/gpu_session.sh STAGE   (from the repository root; results under $OUT)
# check: GPU correctness tests of the kernels and graphs, the doctor, the all-reduce benchmark on 4 GPUs
#        (GRIDS=64x256,... times other launch grids of the custom kernels too)
# engine: the 8b-shape engine benchmark, TP=1 (with the transformers baseline) and TP=2
# warm: cold and warm starts of a TP=2 engine, the second warm-up run, the doctor, the communicator tests
set -uo pipefail
cd "$(dirname "$0")/.."
SKIP_WHEELS=${SKIP_WHEELS:-ray} source scripts/gpu_setup.sh || exit 1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
MODEL=/tmp/tpfleet-m8b
GPUS=$(nvidia-smi -L | wc -l)
log() { echo "=== $(date +%T) $*"; }

make_model() {
  [ -f "$MODEL/config.json" ] || python3 -m tpfleet make-model --preset 8b-shape --out "$MODEL" --device cuda
}

case "$1" in
  check)
    log "GPU tests: fused ops, attention, parity, graphs"
    timeout 330 python3 -m pytest -q -x -m gpu tests/test_triton_ops.py tests/test_attention.py \
      tests/test_model_parity.py tests/test_graphs_gpu.py > "$OUT/tests.log" 2>&1
    grep -E "passed|failed|Error" "$OUT/tests.log" | tail -15
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
  warm)
    make_model
    export TPFLEET_CACHE_DIR=$(mktemp -d)  # cold: empty caches (Triton's lives under it too)
    start() {
      python3 -c "from tpfleet.config import EngineConfig; from tpfleet.engine.llm_engine import LLMEngine; \
LLMEngine(EngineConfig(model='$MODEL', tp_size=2, device='cuda', graph_mode='full')).shutdown()" 2>&1 \
        | grep "phase: jit_caches"
    }
    log "cold engine start, TP=2"; time start
    log "warm engine start, TP=2"; time start
    export TPFLEET_CACHE_DIR=$(mktemp -d)
    log "warmup, cold caches"
    timeout 300 python3 -m tpfleet warmup --model "$MODEL" --tp 1,2 --graph-mode full | tail -4
    log "warmup, second run"
    time python3 -m tpfleet warmup --model "$MODEL" --tp 1,2 --graph-mode full | tail -4
    log "doctor"; python3 -m tpfleet doctor | tee "$OUT/doctor.txt" | tail -40
    python3 -m tpfleet doctor --json > "$OUT/doctor.json"
    log "communicator tests"; timeout 240 python3 -m pytest -q -x -m gpu tests/test_comm_gpu.py 2>&1 | tail -8
    ;;
  *) echo "usage: $0 check|engine|warm" >&2; exit 2 ;;
esac
