"""What a CUDA-graph bucket's capture on first use costs a served step: every step's milliseconds at a few
batch sizes, on an engine that captured only the largest bucket of each kind at start (the default).

    python3 scripts/first_use_capture.py MODEL_DIR [BATCH ...]

The engine's own log names each capture and its milliseconds; the step that captured shows as the slow one.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams


def main(model: str, batches: list[int]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = LLMEngine(EngineConfig(model=model, device="cuda", graph_mode="piecewise"))
    try:
        for batch in batches:
            params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
            for i in range(batch):  # prompts of their own: no prefix cache hits
                engine.add_request([1000 + batch + i] * 96, params)
            times = []
            while engine.has_work():
                torch.cuda.synchronize()
                start = time.perf_counter()
                engine.step()
                torch.cuda.synchronize()
                times.append(1e3 * (time.perf_counter() - start))
            print(f"batch {batch}: steps ms " + " ".join(f"{t:.1f}" for t in times), flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], [int(b) for b in sys.argv[2:]] or [1, 8, 64, 200])
