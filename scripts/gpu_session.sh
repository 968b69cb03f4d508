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
# rl: the one-GPU tests of the RL contract, MoE and colocation, then `bench colocate` with the memory
#     saver and `bench moe --sweep`
# roofline: attention's GPU tests and tile sweep, then `bench engine` over batches and contexts with
#           logprobs on and off
# rlwork: the RL-shaped workload, in-process and over HTTP (RL_MAX sets its output cap)
# ab: where this checkout's start-up goes (imports, a profiled engine start), then BASE (a package copy, e.g.
#     a `git archive` of an old main) and this checkout in turn through scripts/ab.py (`python3 -P`: `-m`
#     would put the checkout's own package first on the path, whatever PYTHONPATH says): time-to-ready,
#     decode steps, the offline and the RL workloads (PARTS picks some)
# start: the GPU tests of graphs and parity (EXTRA_TESTS adds files, TESTS_K filters, TEST_S=0 skips), then time-to-ready
#        of BASE and this checkout (TREES: twice), cold and warm caches each (scripts/ab.py --parts start)
# colocate: `bench colocate` with the memory saver, the trainer's refill included
# moe: `bench moe --sweep` (SWEEP=0 keeps the table an earlier stage wrote), then the 30b-a3b-shape engine with
#      random weights (`make-model --no-weights`, `--load-format dummy`: no 61 GB checkpoint): `bench engine` over
#      batches, offline with logprobs off and on, then transformers (built from the config, random weights) on
#      the same offline workload (HF_CHUNK sequences per generate call, 32 by default: its prefill of 64 does not
#      fit beside the weights on an 80 GB card; BATCHES, CONTEXTS and LOGPROBS narrow the run; with BATCHES=1
#      CONTEXTS=128 LOGPROBS=off SWEEP=0 an H100 needed 200 s for the engine, 70-110 s for transformers' compile and
#      265 s for its two chunks (runs 97 and 104), hence ENGINE_S's default of 580; HF_EXPERTS picks transformers'
#      experts implementation, e.g. grouped_mm)
# moestep: the MoE GPU tests, then with BASE (a package copy) the 30b-a3b-shape decode step (random weights,
#          batch 1 and 64, kernel breakdown) of BASE and of this checkout, then the GEMV sweep of its attention
#          and router, the MoE layer's sweep, and this checkout's step again (a stage's _S=0 skips it)
# rows: the skinny GEMM's GPU tests (EXTRA_TESTS adds files, TESTS_K filters), then `bench gemv --rows --sweep`
#       (cuBLAS and tpfleet's skinny GEMM at 8-256 rows, the table the engine then reads), then the decode steps of
#       BASE and this checkout through scripts/ab.py (TREES: trees in turn, each TREE or TREE@VAR=VALUE,...)
# steps: the decode step of each tree in TREES in turn (a package copy such as prev, or ., each TREE or
#        TREE@VAR=VALUE,...), on each preset of PRESETS
#        with random weights (`make-model --no-weights`, `--load-format dummy`), full graphs, at BATCHES x CONTEXTS
# last: the RL loop's GPU test (alone on the GPU: the fleet refuses a GPU another process holds), the RL
#       workload in-process and over HTTP, `bench start`, and the attention tile sweep
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
      PYTHONPATH=/tmp/site:$PWD/$tree timeout 150 python3 -P -m tpfleet bench engine --model "$MODEL" --device cuda \
        --tp 1 --graph-mode piecewise --no-hf --num-seqs 128 --out "$OUT/$(basename $tree)_$run" 2>/dev/null \
        | grep -E "^ +(1|8|64|256) |measured|^offline|^mixed"
    done; done
    ;;
  rl)
    make_model > /dev/null 2>&1 &
    log "GPU tests of the RL contract, MoE and colocation"
    timeout ${TEST_S:-240} python3 -m pytest -q -rf -m gpu -p no:cacheprovider tests/test_fused_sampling.py tests/test_moe_kernel.py \
      tests/test_graphs_gpu.py tests/test_weight_sync.py tests/test_rl_loop.py tests/test_gpu_server.py \
      tests/test_colocation.py -k "not interpreter" > "$OUT/tests.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^ERROR|Error" "$OUT/tests.log" | cut -c1-300 | tail -15
    wait
    log "bench colocate, memory saver"
    timeout 150 python3 -m tpfleet bench colocate --model "$MODEL" --device cuda --enable-memory-saver --cycles 20 \
      --out "$OUT" 2>&1 | grep -v "^tpfleet phase\|Loading" | tail -25
    log "bench moe --sweep"
    timeout ${MOE_S:-150} python3 -m tpfleet bench moe --sweep --tokens 1,4,16,64,256,1024,4096,8192 --out "$OUT" 2>&1 \
      | tail -25
    ;;
  roofline)
    make_model > /dev/null 2>&1 &
    log "attention GPU tests"
    timeout 120 python3 -m pytest -q -rf -m gpu -p no:cacheprovider tests/test_attention.py -k "not interpreter" \
      > "$OUT/attention_tests.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/attention_tests.log" | cut -c1-300 | tail -8
    log "bench attention --tiles"
    timeout ${ATTN_S:-150} python3 -m tpfleet bench attention --tiles --out "$OUT"
    wait
    log "bench engine: decode roofline, offline with logprobs off and on"
    timeout ${ENGINE_S:-300} python3 -m tpfleet bench engine --model "$MODEL" --device cuda --tp 1 \
      --graph-mode piecewise --no-hf --logprobs both --contexts ${CONTEXTS:-128,1024,4096} --max-num-seqs 512 \
      --out "$OUT" 2>&1 \
      | grep -v "^tpfleet phase\|Loading"
    ;;
  rlwork)
    make_model
    log "bench engine --workload rl"
    timeout ${RL_S:-300} python3 -m tpfleet bench engine --workload rl --model "$MODEL" --device cuda --tp 1 \
      --graph-mode piecewise --rl-max-output ${RL_MAX:-2048} --logprobs on --out "$OUT/rl" 2>&1 \
      | grep -v "^tpfleet phase\|Loading" | tail -20
    ;;
  ab)
    make_model > /dev/null 2>&1 &
    log "imports of \`tpfleet serve\` in a fresh interpreter (this checkout)"
    python3 -P -X importtime -c "import tpfleet.cli, tpfleet.server.launch, tpfleet.engine.llm_engine, \
tpfleet.server.app, uvicorn" 2> "$OUT/importtime.txt"
    sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -12
    python3 -P scripts/ab.py --make-requests /tmp/ab-requests.json
    wait
    for tree in "${BASE:?set BASE}" .; do
      log "scripts/ab.py, $tree"
      PYTHONPATH=/tmp/site:$PWD/$tree timeout ${AB_S:-240} python3 -P scripts/ab.py --model "$MODEL" \
        --requests /tmp/ab-requests.json --parts ${PARTS:-start,decode,offline,rl} \
        --out "$OUT/ab_$(basename $(realpath $tree)).json" 2>&1 | grep "^{\|^\[\|Error\|error"
    done
    log "engine start-up, profiled (this checkout, warm)"
    python3 -P -c "import cProfile, pstats; from tpfleet.config import EngineConfig; \
from tpfleet.engine.llm_engine import LLMEngine; \
cProfile.run('LLMEngine(EngineConfig(model=\"$MODEL\", device=\"cuda\", graph_mode=\"piecewise\")).shutdown()', \
'$OUT/start.prof'); pstats.Stats('$OUT/start.prof').sort_stats('cumulative').print_stats(45)" 2>&1 \
      | grep -v "^tpfleet phase\|Loading\|Capturing" | tail -60 > "$OUT/start_profile.txt"
    head -70 "$OUT/start_profile.txt" | tail -48 | cut -c1-160
    ;;
  rows)
    make_model > /dev/null 2>&1 &
    log "GPU tests: the skinny GEMM"
    timeout ${TEST_S:-120} python3 -m pytest -v --tb=short -m gpu -p no:cacheprovider tests/test_gemm.py \
      ${EXTRA_TESTS:-} ${TESTS_K:+-k "$TESTS_K"} > "$OUT/tests.log" 2>&1
    status=$?; echo "pytest exit $status"; grep -E "PASSED|FAILED|ERROR|^E  " "$OUT/tests.log" | cut -c1-200 | tail -12
    wait
    [ $status = 0 ] || exit 1
    log "bench gemv --rows --sweep, 8b-shape, TP=1"
    timeout ${ROWS_S:-200} python3 -m tpfleet bench gemv --rows ${ROWS:-8,16,32,64,128,256} --sweep --tp 1 --out "$OUT" \
      2>&1 | grep -v "^ *$"
    cp "$(python3 -c 'from tpfleet import env; print(env.cache_root())')"/tuning/gemm-rows-*.json "$OUT/" 2>/dev/null
    python3 -P scripts/ab.py --make-requests /tmp/ab-requests.json
    for spec in ${TREES:-"${BASE:?set BASE}" .}; do  # TREE or TREE@VAR=VALUE,VAR=VALUE (its environment)
      tree=${spec%%@*}; vars=$([ "$spec" != "$tree" ] && echo "${spec#*@}" | tr , ' ')
      log "scripts/ab.py --parts decode, $tree $vars"
      env $vars PYTHONPATH=/tmp/site:$PWD/$tree timeout ${AB_S:-150} python3 -P scripts/ab.py --model "$MODEL" \
        --requests /tmp/ab-requests.json --parts decode \
        --out "$OUT/ab_$(basename $(realpath $tree))_$(echo "$vars" | tr -c 'A-Za-z0-9\n' _).json" 2>&1 \
        | grep "^{\|^\[\|Error\|error"
    done
    ;;
  start)
    make_model > /dev/null 2>&1 &
    if [ "${TEST_S:-200}" != 0 ]; then
      log "GPU tests: graphs, parity (and EXTRA_TESTS)"
      timeout ${TEST_S:-200} python3 -m pytest -q -rf -m gpu -p no:cacheprovider tests/test_graphs_gpu.py \
        tests/test_model_parity.py ${EXTRA_TESTS:-} ${TESTS_K:+-k "$TESTS_K"} > "$OUT/tests.log" 2>&1
      echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^ERROR|^E  " "$OUT/tests.log" | cut -c1-300 | tail -8
    fi
    python3 -P scripts/ab.py --make-requests /tmp/ab-requests.json
    wait
    for tree in ${TREES:-"${BASE:?set BASE}" . .}; do
      log "time to ready, $tree"
      PYTHONPATH=/tmp/site:$PWD/$tree timeout 120 python3 -P scripts/ab.py --model "$MODEL" \
        --requests /tmp/ab-requests.json --parts start --out "$OUT/start_$(basename $(realpath $tree))_$RANDOM.json" \
        2>&1 | grep "^{\|Error\|error"
    done
    ;;
  colocate)
    make_model
    log "bench colocate, memory saver, refill included"
    timeout 120 python3 -m tpfleet bench colocate --model "$MODEL" --device cuda --enable-memory-saver --cycles 20 \
      --out "$OUT" 2>&1 | grep -v "^tpfleet phase\|Loading\|Capturing" | tail -8
    ;;
  moe)
    python3 -m tpfleet make-model --preset 30b-a3b-shape --no-weights --out /tmp/tpfleet-m30b > /dev/null
    if [ "${SWEEP:-1}" = 1 ]; then
      log "bench moe --sweep (the tuning table the engine then reads)"
      timeout ${MOE_S:-150} python3 -m tpfleet bench moe --sweep --tokens ${TOKENS:-1,2,4,16,64,256,4096} --out "$OUT" \
        2>&1 | tail -12
    fi
    log "bench engine, 30b-a3b-shape, dummy weights"
    timeout ${ENGINE_S:-580} python3 -m tpfleet bench engine --model /tmp/tpfleet-m30b --load-format dummy \
      --device cuda --tp 1 --graph-mode piecewise --num-seqs 64 --logprobs ${LOGPROBS:-both} \
      --batches ${BATCHES:-1,8,64} --contexts ${CONTEXTS:-128,1024} --hf-chunk ${HF_CHUNK:-32} \
      ${HF_EXPERTS:+--hf-experts $HF_EXPERTS} --out "$OUT" 2>&1 \
      | grep -v "^tpfleet phase\|Loading\|Capturing" > "$OUT/moe.log"
    tail -${LINES_SHOWN:-50} "$OUT/moe.log"
    ;;
  moestep)
    python3 -m tpfleet make-model --preset 30b-a3b-shape --no-weights --out /tmp/tpfleet-m30b > /dev/null
    step() {  # tree, label: its 30b-a3b-shape decode step with random weights (BATCHES), batch 1's kernels
      log "bench engine, 30b-a3b-shape, dummy weights, decode only: $2 ($1)"
      PYTHONPATH=/tmp/site:$PWD/$1 timeout ${ENGINE_S:-150} python3 -P -m tpfleet bench engine \
        --model /tmp/tpfleet-m30b --load-format dummy --device cuda --tp 1 --graph-mode piecewise --num-seqs 0 \
        --no-hf --batches ${BATCHES:-1,64} --contexts 128 --out "$OUT/$2" > "$OUT/$2.log" 2>&1
      grep -E "^ +[0-9]+ +128 |^batch-1|^ +[0-9.]+ us " "$OUT/$2.log" | head -16
    }
    if [ "${TEST_S:-150}" != 0 ]; then
      log "GPU tests: MoE kernels and router (TESTS_K filters), graphs, attention, the engines against transformers"
      timeout ${TEST_S:-150} python3 -m pytest -q -rf -m gpu -p no:cacheprovider tests/test_moe_kernel.py \
        tests/test_moe.py tests/test_graphs_gpu.py tests/test_gemv.py tests/test_attention.py tests/test_model_parity.py \
        -k "${TESTS_K:-moe or route or matches_transformers or gemv_matches}" > "$OUT/tests.log" 2>&1
      echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^ERROR|^E  " "$OUT/tests.log" | cut -c1-300 | tail -8
    fi
    if [ -n "${BASE:-}" ]; then  # BASE (a package copy) and this checkout, before either tuning table exists
      step "$BASE" base; step . untuned
    fi
    if [ "${GEMV_S:-150}" != 0 ]; then
      log "bench gemv --preset 30b-a3b-shape --sweep (attention projections and router, TP=1)"
      timeout ${GEMV_S:-150} python3 -m tpfleet bench gemv --preset 30b-a3b-shape --tp 1 --sweep --out "$OUT"
    fi
    if [ "${MOE_S:-120}" != 0 ]; then
      log "bench moe --sweep (the tuning table the engine then reads)"
      timeout ${MOE_S:-120} python3 -m tpfleet bench moe --sweep --tokens ${TOKENS:-1,2,4,16,64,256,4096} \
        --out "$OUT" 2>&1 | tail -10
    fi
    step . tuned
    cp "$(python3 -c 'from tpfleet import env; print(env.cache_root())')"/tuning/* "$OUT/" 2>/dev/null
    ;;
  steps)
    for preset in ${PRESETS:-30b-a3b-shape}; do
      python3 -m tpfleet make-model --preset "$preset" --no-weights --out "/tmp/tpfleet-$preset" > /dev/null
      i=0
      for spec in ${TREES:-prev . . prev}; do
        tree=${spec%%@*}; vars=""; [ "$spec" != "$tree" ] && vars=$(echo "${spec#*@}" | tr , ' ')
        i=$((i + 1)); label="${preset}_$(basename "$(realpath "$tree")")${vars:+_${vars// /_}}_$i"
        log "bench engine, $preset, dummy weights, decode only: $label"
        env $vars PYTHONPATH=/tmp/site:$PWD/$tree timeout ${ENGINE_S:-120} python3 -P -m tpfleet bench engine \
          --model "/tmp/tpfleet-$preset" --load-format dummy --device cuda --tp 1 --graph-mode full \
          --max-num-seqs ${MAX_SEQS:-8} --num-seqs 0 --no-hf --batches ${BATCHES:-1} --contexts ${CONTEXTS:-128} \
          --out "$OUT/$label" > "$OUT/$label.log" 2>&1
        echo "exit $?"; grep -E "^ +[0-9]+ +[0-9]+ |^batch-1" "$OUT/$label.log" | head -8
      done
    done
    ;;
  last)
    log "GPU test: the RL loop"
    timeout 100 python3 -m pytest -q -rf -m gpu -p no:cacheprovider tests/test_rl_loop.py > "$OUT/tests.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^E  |^step" "$OUT/tests.log" | cut -c1-200 | tail -12
    make_model
    log "bench engine --workload rl"
    timeout 130 python3 -m tpfleet bench engine --workload rl --model "$MODEL" --device cuda --tp 1 \
      --graph-mode piecewise --rl-max-output 1024 --logprobs on --max-num-seqs 512 --out "$OUT" 2>&1 \
      | grep -v "^tpfleet phase\|Loading\|Capturing" | tail -6
    log "bench start"
    timeout 110 python3 -m tpfleet bench start --model "$MODEL" --device cuda --tp 1 --out "$OUT" 2>&1 \
      | grep -v "^tpfleet phase\|Loading\|Capturing" | tail -14
    log "bench attention --tiles"
    timeout 70 python3 -m tpfleet bench attention --tiles --contexts 1024,4096 --out "$OUT"
    ;;
  *) echo "usage: $0 tests|ops|kernels|check|engine|pdl|warm|fleet|compare|rl|roofline|rlwork|ab|start|colocate|moe|moestep|steps|last" \
       >&2; exit 2 ;;
esac
