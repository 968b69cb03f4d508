#!/usr/bin/env bash
# One call on one GPU: GPU tests of TREE, then the TP=1 engine benchmark of BASE and of TREE (logprobs off
# and on) on the 8b-shape model. Results and logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
SKIP_WHEELS=ray source scripts/gpu_setup.sh || exit 1
OUT=${OUT:-gpu-out}; MODEL=/tmp/tpfleet-m8b; mkdir -p "$OUT"
log() { echo "=== $(date +%T) $*"; }
log "make model"
PYTHONPATH=/tmp/site:$PWD/$TREE python3 -m tpfleet make-model --preset 8b-shape --out $MODEL --device cuda | tail -1
log "GPU tests"
(cd "$TREE" && PYTHONPATH=/tmp/site:$PWD timeout ${TEST_S:-160} python3 -m pytest -q -rf -m gpu -p no:cacheprovider \
  tests/test_graphs_gpu.py tests/test_model_parity.py tests/test_greedy.py tests/test_moe_kernel.py \
  tests/test_memory_saver_gpu.py tests/test_weight_sync.py tests/test_triton_ops.py -k "not interpreter") \
  > "$OUT/tests.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | tail -15
log "engine TP=1, $BASE"
PYTHONPATH=/tmp/site:$PWD/$BASE timeout 130 python3 -m tpfleet bench engine --model $MODEL --device cuda --tp 1 \
  --graph-mode piecewise --no-hf --num-seqs 128 --out "$OUT/base" 2>/dev/null | grep -E "^ +(1|8|64|256) |measured|^offline"
log "engine TP=1, $TREE"
PYTHONPATH=/tmp/site:$PWD/$TREE timeout 190 python3 -m tpfleet bench engine --model $MODEL --device cuda --tp 1 \
  --graph-mode piecewise --no-hf --num-seqs 128 --batches 1,8,64,256 --contexts 128,1024 --logprobs both \
  --out "$OUT/tree" > "$OUT/tree.txt" 2> "$OUT/tree.err"; echo "exit $?"; tail -30 "$OUT/tree.txt"; tail -3 "$OUT/tree.err"
