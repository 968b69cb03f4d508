"""One warm-up job: start an engine for a config, run the shapes it will run, report cache use.

    python -m tpfleet.warmup.child '{"model": "...", "tp_size": 2, "device": "cuda", ...}'
"""

from __future__ import annotations

import json
import sys
import time

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams
from tpfleet.jit import STATS, cache_root
from tpfleet.warmup.runner import RESULT_PREFIX


def main(argv: list[str]) -> int:
    cfg = EngineConfig(**json.loads(argv[0]))
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    try:
        params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        # a long prefill (chunked), a batch of short ones, and their decodes: every kernel shape family
        engine.add_request(list(range(1, min(600, engine.max_seq_len - 16))), params)
        for i in range(8):
            engine.add_request([1 + i] * 20, params)
        while engine.has_work():
            engine.step()
    finally:
        engine.shutdown()
    tuning = [str(p) for p in (cache_root() / "tuning").glob("*.json")]
    print(RESULT_PREFIX + " " + json.dumps({"hits": STATS.hits, "misses": STATS.misses, "jit": STATS.report(),
                                            "entries": STATS.entries + tuning,
                                            "seconds": time.perf_counter() - t0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
