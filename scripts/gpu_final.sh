#!/usr/bin/env bash
# One short call on one GPU: the GPU tests of TREE (graphs, memory saver, colocation, fused MoE), then the
# decode step of BASE and TREE in turn (batches 1, 1, 1, 64, 256, full graphs, TP=1, 8b-shape).
set -uo pipefail
cd "$(dirname "$0")/.."
SKIP_WHEELS=ray source scripts/gpu_setup.sh || exit 1
OUT=${OUT:-gpu-out}; MODEL=/tmp/tpfleet-m8b; mkdir -p "$OUT"
log() { echo "=== $(date +%T) $*"; }
log "make model"
PYTHONPATH=/tmp/site:$PWD/$TREE python3 -P -m tpfleet make-model --preset 8b-shape --out $MODEL --device cuda > /dev/null &
(cd "$TREE" && PYTHONPATH=/tmp/site:$PWD timeout ${TEST_S:-80} python3 -m pytest -q -rf -m gpu -p no:cacheprovider \
  tests/test_graphs_gpu.py tests/test_memory_saver_gpu.py tests/test_colocation.py tests/test_moe_kernel.py \
  -k "not interpreter and not 8192") > "$OUT/tests.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/tests.log" | cut -c1-240 | tail -12
wait
for tree in "$BASE" "$TREE"; do
  log "decode TP=1, $tree"
  PYTHONPATH=/tmp/site:$PWD/$tree timeout ${BENCH_S:-45} python3 -P -m tpfleet bench decode --model $MODEL --device cuda \
    --tp 1 --graph-mode full --batch-sizes 1,1,1,64,256 2>/dev/null | grep "^batch"
done
