"""`tpfleet bench-decode`: a smoke benchmark of decode throughput at fixed batch sizes.

Prompts are random token ids, generation ignores EOS, and only steps in which every sequence
is decoding are timed, so prefill does not blur the figure. A baseline to beat, not a target.
"""

from __future__ import annotations

import json
import random
import time

import torch

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decode(cfg: EngineConfig, batch_sizes: list[int], input_len: int, output_len: int,
                 json_path: str | None = None) -> list[dict]:
    engine = LLMEngine(cfg)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    device = engine.runner.device
    results = []
    try:
        for bs in batch_sizes:
            params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
            seqs = [engine.add_request([rng.randrange(vocab) for _ in range(input_len)], params) for _ in range(bs)]
            while any(s.num_completion_tokens == 0 for s in seqs):
                engine.step()
            _sync(device)
            steps, tokens, t0 = 0, 0, time.perf_counter()
            while engine.has_work():
                tokens += len(engine.step())
                steps += 1
            _sync(device)
            dt = time.perf_counter() - t0
            row = {"batch_size": bs, "decode_steps": steps, "step_ms": 1000 * dt / steps,
                   "tokens_per_s": tokens / dt}
            results.append(row)
            print(f"batch {bs:4d}: {row['step_ms']:8.2f} ms/step  {row['tokens_per_s']:10.1f} tokens/s")
            engine.flush_cache()
    finally:
        engine.shutdown()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": cfg.to_dict(), "device": str(device),
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                       "input_len": input_len, "output_len": output_len, "results": results}, f, indent=2)
    return results
