"""One warm-up job: start an engine for a config, run the shapes it will run, report cache use.

    python -m tpfleet.warmup.child '{"model": "...", "tp_size": 2, "device": "cuda", ...}'

The argument is an EngineConfig document (EngineConfig.to_json). A failure is written to the exit
record the runner names in TPFLEET_EXIT_RECORD (tpfleet.exits).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from tpfleet import env, exits
from tpfleet.config import EngineConfig
from tpfleet.jit import STATS
from tpfleet.phases import format_warmup_result


def main(argv: list[str]) -> int:
    cfg = EngineConfig.from_json(argv[0])
    try:
        return warm_up(cfg)
    except BaseException as exc:
        exits.record_engine_failure(exc, cfg.tp_size)
        raise


def warm_up(cfg: EngineConfig) -> int:
    from tpfleet.engine.llm_engine import LLMEngine
    from tpfleet.engine.sequence import SamplingParams

    started = time.perf_counter()
    # Every graph bucket, so that each one's kernels are compiled now, not on the first served step that needs it.
    engine = LLMEngine(dataclasses.replace(cfg, capture_all_graphs=True))
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
    tuning = [str(p) for p in (env.cache_root() / "tuning").glob("*.json")]
    print(format_warmup_result({"hits": STATS.hits, "misses": STATS.misses, "jit": STATS.report(),
                                "entries": STATS.entries + tuning, "seconds": time.perf_counter() - started}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
