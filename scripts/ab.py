"""One tree's side of an A/B on one GPU: the same measurements on whatever `tpfleet` package is first on
the path, through the engine API every tree since 11b2d68 has (EngineConfig, add_request, step, drain,
abort), so that this checkout and an old main are timed by the same code in the same call.

    python3 -P scripts/ab.py --model DIR --requests REQ.json --out OUT.json     (PYTHONPATH picks the tree)
    python3 -P scripts/ab.py --make-requests REQ.json --vocab V                  (this checkout writes them)

`-P` matters: without it the checkout's own package would shadow the one PYTHONPATH names. Measured:
time-to-ready of `tpfleet serve` (cold caches, then warm), the decode step at fixed (batch, context)
points with the batch kept whole, the offline nano-vllm workload (greedy), and the RL-shaped workload
(temperature 1; with and without logprobs where the tree can return them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

DECODE_POINTS = ((1, 1024), (64, 1024), (256, 1024), (64, 4096))
STEPS = 32


def make_requests(path: str, vocab: int) -> None:
    """The offline lengths and the RL requests, from this checkout's own benchmark definitions."""
    from tpfleet.bench.engine import offline_lens
    from tpfleet.bench.workloads import RLWorkload

    rl = RLWorkload(max_output=1024)
    document = {"offline": offline_lens(256, 1024), "offline_warmup": offline_lens(256, 1024, seed=1),
                "rl": rl.requests(vocab), "rl_warmup": rl.warmup(vocab)}
    with open(path, "w") as f:
        json.dump(document, f)


def time_start(model: str, device: str, caches: str) -> dict:
    """`tpfleet serve` launched as a user would, until its ready phase; seconds per phase line."""
    env = {**os.environ, "TPFLEET_CACHE_DIR": os.path.join(caches, "tpfleet"),
           "TRITON_CACHE_DIR": os.path.join(caches, "triton")}
    cmd = [sys.executable, "-P", "-m", "tpfleet.cli", "serve", "--model", model, "--tp", "1", "--device", device,
           "--graph-mode", "piecewise" if device == "cuda" else "eager"]
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    phases = []
    try:
        for line in proc.stdout:
            if line.startswith("tpfleet phase:"):
                name, _, payload = line[len("tpfleet phase:"):].strip().partition(" ")
                info = json.loads(payload)
                phases.append((name, info["t"], info.get("seconds")))  # seconds: the phase's own, if it says
                if name == "ready":
                    break
    finally:
        proc.terminate()
        proc.wait(60)
    if not phases or phases[-1][0] != "ready":
        raise RuntimeError(f"serve did not become ready: {phases}")
    rows, before = [], launched
    for name, t, own in phases:
        rows.append({"phase": name, "seconds": round(t - before, 3), **({"own_s": own} if own is not None else {})})
        before = t
    return {"phases": rows, "total_s": round(phases[-1][1] - launched, 3)}


def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_step(engine, bs: int, context: int) -> dict:
    """Step time with `bs` sequences decoding around `context` tokens each, every one of them decoding in
    every timed step (checked)."""
    from tpfleet.engine.sequence import SamplingParams

    rng = random.Random(bs * 7919 + context)
    vocab = engine.model_config.vocab_size
    prompt_len = context - STEPS // 2
    params = SamplingParams(max_new_tokens=engine.max_seq_len - prompt_len, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request([rng.randrange(vocab) for _ in range(prompt_len)], params) for _ in range(bs)]
    while any(s.num_completion_tokens == 0 for s in seqs):
        engine.step()
    engine.drain()
    sync()
    before = sum(s.num_completion_tokens for s in seqs)
    t = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
    engine.drain()
    seconds = time.perf_counter() - t
    decoded = sum(s.num_completion_tokens for s in seqs) - before
    for s in seqs:
        engine.abort(s.rid)
    engine.drain()
    engine.flush_cache()
    if decoded != bs * STEPS:
        raise RuntimeError(f"batch {bs} context {context}: {decoded} tokens in {STEPS} steps")
    return {"batch": bs, "context": context, "step_ms": round(1e3 * seconds / STEPS, 3)}


def run_batch(engine, requests: list, temperature: float, return_logprob: bool | None) -> dict:
    """All requests added at once, stepped to the end: output tokens per second and the last finish."""
    from tpfleet.engine.sequence import SamplingParams

    extra = {}
    if return_logprob is not None:
        from tpfleet.engine.sequence import OutputOptions
        extra["options"] = OutputOptions(return_logprob=return_logprob)
    sync()
    start = time.perf_counter()
    seqs = [engine.add_request(prompt, SamplingParams(max_new_tokens=n, temperature=temperature, ignore_eos=True),
                               **extra) for prompt, n in requests]
    while engine.has_work():
        engine.step()
    engine.drain()
    seconds = time.perf_counter() - start
    tokens = sum(s.num_completion_tokens for s in seqs)
    if tokens != sum(n for _, n in requests):
        raise RuntimeError(f"{tokens} output tokens, {sum(n for _, n in requests)} asked for")
    engine.flush_cache()
    return {"seconds": round(seconds, 3), "output_tokens": tokens, "output_tok_s": round(tokens / seconds, 1),
            "return_logprob": return_logprob}


def offline_requests(lens: list, seed: int, vocab: int) -> list:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(n_in)], n_out) for n_in, n_out in lens]


def measure(model: str, device: str, requests: dict, parts: set[str]) -> dict:
    import tpfleet
    out = {"tpfleet": os.path.dirname(tpfleet.__file__)}
    if "start" in parts:
        with tempfile.TemporaryDirectory(prefix="tpfleet-ab-") as caches:
            out["start_cold"] = time_start(model, device, caches)
            out["start_warm"] = time_start(model, device, caches)
        print(json.dumps({k: out[k] for k in ("start_cold", "start_warm")}), flush=True)
    from tpfleet.config import EngineConfig
    from tpfleet.engine.llm_engine import LLMEngine
    try:
        from tpfleet.engine.sequence import OutputOptions  # noqa: F401 - logprobs exist in this tree
        logprobs = [False, True]
    except ImportError:
        logprobs = [None]
    engine = LLMEngine(EngineConfig(model=model, tp_size=1, device=device,
                                    graph_mode="piecewise" if device == "cuda" else "eager", max_num_seqs=512))
    try:
        vocab = engine.model_config.vocab_size
        if "decode" in parts:
            decode_step(engine, 1, 1024)  # first steps of a process pay for lazy initialisation
            out["decode"] = [decode_step(engine, bs, ctx) for bs, ctx in DECODE_POINTS]
            print(json.dumps(out["decode"]), flush=True)
        if "offline" in parts:
            run_batch(engine, offline_requests(requests["offline_warmup"], 1, vocab), 0.0, None)
            out["offline"] = run_batch(engine, offline_requests(requests["offline"], 0, vocab), 0.0, None)
            print(json.dumps(out["offline"]), flush=True)
        if "rl" in parts:
            run_batch(engine, requests["rl_warmup"], 1.0, logprobs[-1])
            out["rl"] = [run_batch(engine, requests["rl"], 1.0, lp) for lp in logprobs]
            print(json.dumps(out["rl"]), flush=True)
    finally:
        engine.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-requests", help="write the request document here and stop")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests")
    p.add_argument("--parts", default="start,decode,offline,rl")
    p.add_argument("--out")
    args = p.parse_args()
    if args.make_requests:
        make_requests(args.make_requests, args.vocab)
        return
    with open(args.requests) as f:
        requests = json.load(f)
    result = measure(args.model, args.device, requests, set(args.parts.split(",")))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
