"""`tpfleet bench engine --workload rl`: an RL rollout batch, in-process and over HTTP through the router.

The batch is what a GRPO step sends: P prompts, each sampled S times as S separate requests with
the same prompt (the prefix cache should make the repeats cheap), at temperature 1 with the sampled
tokens' logprobs, ignore_eos so that every output is as long as drawn. Output lengths follow a
lognormal (median a quarter of the cap, sigma 1) clipped to [16, cap]: most rollouts are short and a
few run to the cap, and the step ends with the last of them, so the tail time is reported apart.

Run (a) in-process through LLMEngine, with and without logprobs (their cost), then the engine is
freed and (b) `tpfleet serve` and the router start as their own processes and the same requests
go to the router at once from an httpx.AsyncClient, as an RL framework sends them.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass

import httpx

from tpfleet.bench import report
from tpfleet.bench.engine import device_name, free_device_memory, sync_device
from tpfleet.bench.start import start_router, start_serve
from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import OutputOptions, SamplingParams


@dataclass(frozen=True)
class RLWorkload:
    prompts: int = 64
    samples: int = 8
    min_prompt: int = 256
    max_prompt: int = 2048
    max_output: int = 4096
    seed: int = 0

    def requests(self, vocab: int, seed: int | None = None) -> list[tuple[list[int], int]]:
        """(prompt ids, output length) per request; a prompt's samples are adjacent and share its ids."""
        rng = random.Random(self.seed if seed is None else seed)
        min_output = min(16, self.max_output)
        median = math.log(max(min_output, self.max_output / 4))
        out = []
        for _ in range(self.prompts):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(self.min_prompt, self.max_prompt))]
            for _ in range(self.samples):
                length = round(rng.lognormvariate(median, 1.0))
                out.append((prompt, min(self.max_output, max(min_output, length))))
        return out

    def warmup(self, vocab: int) -> list[tuple[list[int], int]]:
        """One sample of each prompt, other prompts, 16 tokens: compiles what the timed run needs and
        leaves nothing in the prefix cache that it could reuse."""
        return [(prompt, min(16, self.max_output)) for prompt, _ in self.requests(vocab, self.seed + 1)[::self.samples]]


def summarize(finish_s: list[float], output_tokens: int, seconds: float, wanted: list[int], got: list[int],
              cached_tokens: int, logprobs_complete: bool | None) -> dict:
    ordered = sorted(finish_s)
    return {"seconds": seconds, "output_tokens": output_tokens, "output_tok_s": output_tokens / seconds,
            "tail_s": ordered[-1], "finish_p50_s": statistics.median(ordered),
            "finish_p90_s": ordered[int(0.9 * (len(ordered) - 1))], "finish_s": finish_s,
            "requests": len(wanted), "complete": got == wanted, "cached_tokens": cached_tokens,
            "logprobs_complete": logprobs_complete}


def run_in_process(engine: LLMEngine, requests: list[tuple[list[int], int]], return_logprob: bool) -> dict:
    """Every request added at once, the engine stepped until all are done; each one's finish time."""
    options = OutputOptions(return_logprob=return_logprob)
    sync_device(engine.runner.device)
    start = time.perf_counter()
    seqs = [engine.add_request(prompt, SamplingParams(max_new_tokens=n, temperature=1.0, ignore_eos=True),
                               options=options) for prompt, n in requests]
    finished: dict[str, float] = {}
    while engine.has_work():
        for out in engine.step():
            if out.seq.is_finished and out.seq.rid not in finished:
                finished[out.seq.rid] = time.perf_counter() - start
    seconds = time.perf_counter() - start
    for seq in seqs:  # aborted or finished without an output this loop saw: count it when the loop ended
        finished.setdefault(seq.rid, seconds)
    got = [s.num_completion_tokens for s in seqs]
    return summarize([finished[s.rid] for s in seqs], sum(got), seconds, [n for _, n in requests], got,
                     sum(s.num_cached_tokens for s in seqs),
                     all(len(s.output_logprobs) == s.num_completion_tokens for s in seqs) if return_logprob else None)


def generate_body(prompt: list[int], max_new_tokens: int, return_logprob: bool) -> dict:
    """A /generate request as Miles and slime send one."""
    return {"input_ids": prompt, "return_logprob": return_logprob,
            "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": max_new_tokens,
                                "ignore_eos": True, "skip_special_tokens": False, "no_stop_trim": True,
                                "spaces_between_special_tokens": False}}


async def send_all(url: str, requests: list[tuple[list[int], int]], return_logprob: bool) -> dict:
    """All requests at once to `url`/generate, one connection each; each one's finish time."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        start = time.perf_counter()

        async def one(prompt: list[int], n: int) -> tuple[float, dict]:
            reply = await client.post("/generate", json=generate_body(prompt, n, return_logprob))
            reply.raise_for_status()
            return time.perf_counter() - start, reply.json()

        done = await asyncio.gather(*(one(prompt, n) for prompt, n in requests))
        seconds = time.perf_counter() - start
    metas = [answer["meta_info"] for _, answer in done]
    got = [m["completion_tokens"] for m in metas]
    logprobs_complete = (all(len(m.get("output_token_logprobs") or []) == m["completion_tokens"] for m in metas)
                         if return_logprob else None)
    return summarize([t for t, _ in done], sum(got), seconds, [n for _, n in requests], got,
                     sum(m.get("cached_tokens", 0) for m in metas), logprobs_complete)


def run_over_http(cfg: EngineConfig, workload: RLWorkload, vocab: int, return_logprob: bool = True,
                  timeout: float = 900.0) -> dict:
    """`tpfleet serve` and the router as processes; the workload through the router, after a warm-up
    through it and a flush of the prefix cache."""
    server = start_serve(cfg, timeout=timeout)
    try:
        router = start_router([server.url])
        try:
            asyncio.run(send_all(router.url, workload.warmup(vocab), return_logprob))
            httpx.post(f"{router.url}/flush_cache", timeout=60).raise_for_status()
            result = asyncio.run(send_all(router.url, workload.requests(vocab), return_logprob))
        finally:
            router.stop()
    finally:
        server_exit_code = server.stop()
    return {**result, "engine_url": server.url, "router_url": router.url, "server_exit_code": server_exit_code,
            "kv_tokens": server.phase_info.get("kv_cache_allocated", {}).get("tokens")}


def bench_rl(cfg: EngineConfig, out_dir: str, workload: RLWorkload, logprobs: str = "both",
             over_http: bool = True) -> dict:
    result: dict = {"config": cfg.to_dict(), "workload": asdict(workload)}
    engine = LLMEngine(cfg)
    device = engine.runner.device
    vocab = engine.model_config.vocab_size
    result["gpu"] = device_name(device)
    result["kv_tokens"] = engine.block_manager.num_blocks * cfg.block_size  # the server's may differ: see http
    try:
        requests = workload.requests(vocab)
        result["prompt_tokens"] = sum(len(p) for p, _ in requests)
        result["wanted_output_tokens"] = sum(n for _, n in requests)
        run_in_process(engine, workload.warmup(vocab), True)
        engine.flush_cache()
        if logprobs in ("both", "on"):
            result["in_process"] = run_in_process(engine, requests, True)
            engine.flush_cache()
        if logprobs in ("both", "off"):
            result["in_process_no_logprob"] = run_in_process(engine, requests, False)
    finally:
        engine.shutdown()
    del engine
    result["memory_after_engine"] = free_device_memory(device)
    if "in_process" in result and "in_process_no_logprob" in result:
        with_logprobs, without = result["in_process"], result["in_process_no_logprob"]
        result["logprob_cost"] = 1 - with_logprobs["output_tok_s"] / without["output_tok_s"]
    if over_http:
        # Like against like: with logprobs, as RL frameworks ask, unless only the run without was asked for.
        result["http"] = run_over_http(cfg, workload, vocab, return_logprob=logprobs != "off")
        baseline = result.get("in_process") or result["in_process_no_logprob"]
        result["http_over_in_process"] = result["http"]["output_tok_s"] / baseline["output_tok_s"]
    return report(result, out_dir, f"rl_tp{cfg.tp_size}_{cfg.device}", format_rl)


def format_rl(r: dict) -> str:
    w = r["workload"]
    lines = [f"RL rollout workload on {r['gpu']}, TP={r['config']['tp_size']}: {w['prompts']} prompts x "
             f"{w['samples']} samples, prompts {w['min_prompt']}-{w['max_prompt']} tokens, outputs up to "
             f"{w['max_output']} (lognormal), temperature 1, ignore_eos; {r['prompt_tokens']} prompt tokens, "
             f"{r['wanted_output_tokens']} output tokens"]
    runs = (("in_process", "in-process, return_logprob"), ("in_process_no_logprob", "in-process, no logprob"),
            ("http", "HTTP via router"))
    for key, label in runs:
        if key in r:
            run = r[key]
            lines.append(f"{label:<34} {run['output_tok_s']:10.0f} output tok/s, last sequence done at "
                         f"{run['tail_s']:.2f} s (p50 {run['finish_p50_s']:.2f} s, p90 {run['finish_p90_s']:.2f} s), "
                         f"{run['cached_tokens']} prompt tokens from the prefix cache, "
                         f"{'all complete' if run['complete'] else 'INCOMPLETE outputs'}")
    if "logprob_cost" in r:
        lines.append(f"logprobs cost {100 * r['logprob_cost']:.1f}% of in-process throughput")
    if "http_over_in_process" in r:
        lines.append(f"HTTP / in-process throughput: {r['http_over_in_process']:.3f} (KV tokens: in-process "
                     f"{r['kv_tokens']}, server {r['http']['kv_tokens']})")
    return "\n".join(lines)
