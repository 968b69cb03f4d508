#!/usr/bin/env bash
# One short call on one GPU: the GPU tests of TREE, the decode step of BASE and TREE in turn (batches
# 1, 1, 1, 64, 256, full graphs, TP=1, 8b-shape), and TREE's offline throughput with logprobs off and on.
set -uo pipefail
cd "$(dirname "$0")/.."
SKIP_WHEELS=ray source scripts/gpu_setup.sh || exit 1
OUT=${OUT:-gpu-out}; MODEL=/tmp/tpfleet-m8b; mkdir -p "$OUT"
log() { echo "=== $(date +%T) $*"; }
log "make model"
PYTHONPATH=/tmp/site:$PWD/$TREE python3 -m tpfleet make-model --preset 8b-shape --out $MODEL --device cuda | tail -1
log "GPU tests"
(cd "$TREE" && PYTHONPATH=/tmp/site:$PWD timeout ${TEST_S:-100} python3 -m pytest -q -rf -m gpu -p no:cacheprovider \
  tests/test_graphs_gpu.py tests/test_model_parity.py tests/test_memory_saver_gpu.py tests/test_moe_kernel.py \
  tests/test_weight_sync.py -k "not interpreter and not 8192") > "$OUT/tests.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-300 | tail -15
for tree in "$BASE" "$TREE"; do
  log "decode TP=1, $tree"
  PYTHONPATH=/tmp/site:$PWD/$tree timeout 60 python3 -m tpfleet bench decode --model $MODEL --device cuda --tp 1 \
    --graph-mode full --batch-sizes 1,1,1,64,256 2>/dev/null | grep "^batch"
done
log "offline, logprobs off and on, $TREE"
PYTHONPATH=/tmp/site:$PWD/$TREE timeout 90 python3 -m tpfleet bench engine --model $MODEL --device cuda --tp 1 \
  --graph-mode full --no-hf --num-seqs 128 --batches 1 --contexts 128 --logprobs both --out "$OUT/tree" \
  > "$OUT/tree.txt" 2> "$OUT/tree.err"; echo "exit $?"; grep -iE "offline|logprob|^ +1 " "$OUT/tree.txt"; tail -2 "$OUT/tree.err"
