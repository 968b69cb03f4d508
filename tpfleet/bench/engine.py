"""`tpfleet bench engine`: decode step latency, offline throughput, and their peers in the same run.

Peers: the memory-bandwidth floor (weights plus KV read per step, over a device-to-device copy
bandwidth measured here, on this GPU), and transformers' generate on the same checkpoint with a
static cache. The mixed-batch measurement times one 256-token step (64 decodes plus a 192-token
prefill chunk) with piecewise graphs and eagerly, same inputs, same process.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import torch

from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.step_input import ModelInput
from tpfleet.engine.sequence import SamplingParams
from tpfleet.kernels import pdl

DECODE_BATCHES = (1, 8, 64, 256)


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def _sync(engine: LLMEngine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


def _random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def decode_latency(engine: LLMEngine, bs: int, prompt_len: int = 128, steps: int = 32, overlap: bool = True,
                   profile: bool = True) -> dict:
    rng = random.Random(bs)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_new_tokens=steps + 64, temperature=0.0, ignore_eos=True)  # + profiled steps
    seqs = [engine.add_request(_random_prompt(rng, prompt_len, vocab), params) for _ in range(bs)]
    while any(s.num_completion_tokens == 0 for s in seqs):
        engine.step()
    # Steps back to back, as a serving loop runs them: under the overlap schedule a step's host work
    # hides behind the GPU work of the one before, so only the loop's total time says what a step costs.
    _sync(engine)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
        if not overlap:
            engine.drain()  # each step read back before the next is launched
    engine.drain()
    row = {"batch": bs, "step_ms": 1e3 * (time.perf_counter() - t) / steps, "mean_context": prompt_len + steps // 2}
    if engine.runner.device.type == "cuda" and profile:
        row["kernels"] = kernel_profile(engine)
        if bs == 1:
            row["host"] = host_profile(engine)
        if engine.cfg.tp_size == 1:
            row["forward_ms"] = forward_ms(engine)
    for s in seqs:
        engine.abort(s.rid)
    return row


def sequential_ms(engine: LLMEngine) -> float:
    """The batch-1 step with every step read back before the next is launched, same process: what
    the overlap schedule buys."""
    return decode_latency(engine, 1, overlap=False, profile=False)["step_ms"]


def forward_ms(engine: LLMEngine, repeats: int = 20) -> float:
    """GPU time of the next step's forward and LM head alone (CUDA events, no scheduling, sampling or
    host copies of results): the step time minus this is host overhead. Re-running the same input
    rewrites the same KV slots, so nothing changes. TP=1 only: it drives rank 0 alone."""
    engine.drain()
    inp = ModelInput.build(engine.scheduler.schedule(), engine.cfg.block_size)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats + 3):
        start.record()
        engine.runner.run(inp)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def kernel_profile(engine: LLMEngine, steps: int = 5, top: int = 12) -> dict:
    """Rank 0's GPU kernels over a few decode steps (CUPTI sees inside CUDA graphs): how many run per
    step, how long they keep the GPU busy, and the costliest. Step time minus busy time is the GPU
    waiting for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        _sync(engine)
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            n_us = per_name.setdefault(e.name, [0, 0.0])
            n_us[0] += 1
            n_us[1] += e.time_range.elapsed_us()
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])
    return {"per_step": sum(n for n, _ in per_name.values()) / steps,
            "busy_ms": sum(us for _, us in per_name.values()) / steps / 1e3,
            "top": [{"name": name[:90], "per_step": n / steps, "us_per_step": us / steps}
                    for name, (n, us) in ranked[:top]]}


def host_profile(engine: LLMEngine, steps: int = 20, top: int = 15) -> list[dict]:
    """Where the driver's Python time goes over a few steps (cProfile, own time per function): the
    part of a step the GPU spends waiting."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}:{name}", "calls_per_step": c / steps,
             "own_us_per_step": 1e6 * own / steps, "cum_us_per_step": 1e6 * cum / steps}
            for (f, line, name), (_, c, own, cum, _) in ranked]


def bench_decode(cfg: EngineConfig, batch_sizes: list[int], prompt_len: int = 128) -> list[dict]:
    """The smoke benchmark: median decode step time at each batch size, nothing else."""
    engine = LLMEngine(cfg)
    try:
        rows = []
        for bs in batch_sizes:
            row = decode_latency(engine, bs, prompt_len)
            row["tokens_per_s"] = bs * 1e3 / row["step_ms"]
            rows.append(row)
            print(f"batch {bs:4d}: {row['step_ms']:8.2f} ms/step  {row['tokens_per_s']:10.1f} tokens/s", flush=True)
            engine.flush_cache()
        return rows
    finally:
        engine.shutdown()


def floor_ms(engine: LLMEngine, bs: int, ctx: int, bandwidth: float) -> float:
    """Bytes one rank must read per decode step (its weight shard, its KV heads for every context
    token), over the measured bandwidth. An untied embedding table is left out: a step reads only
    its tokens' rows of it."""
    runner = engine.runner
    model = runner.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.embed_tokens.weight is not model.lm_head.weight:
        weights -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    attn = model.layers[0].self_attn
    kv = bs * ctx * 2 * attn.num_kv_heads * attn.head_dim * runner.dtype.itemsize * len(model.layers)
    return 1e3 * (weights + kv) / bandwidth


def offline_throughput(engine: LLMEngine, lens: list[tuple[int, int]], seed: int = 0) -> dict:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    seqs = []
    torch.cuda.synchronize()
    t = time.perf_counter()
    for n_in, n_out in lens:
        seqs.append(engine.add_request(_random_prompt(rng, n_in, vocab),
                                       SamplingParams(max_new_tokens=n_out, temperature=0.0, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    dt = time.perf_counter() - t
    out = sum(s.num_completion_tokens for s in seqs)
    return {"seconds": dt, "output_tokens": out, "output_tok_s": out / dt,
            "total_tok_s": (out + sum(n for n, _ in lens)) / dt}


def mixed_step(engine: LLMEngine, repeats: int = 20) -> dict | None:
    """One 256-token step (64 decodes + a 192-token chunk), piecewise graphs against eager."""
    runner = engine.runner
    if runner.piecewise_graphs is None or engine.cfg.tp_size > 1:  # runs rank 0 alone: TP=1 only
        return None
    rng = random.Random(7)
    vocab = engine.model_config.vocab_size
    decode = SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(_random_prompt(rng, 64, vocab), decode) for _ in range(64)]
    while any(s.num_completion_tokens == 0 for s in seqs):
        engine.step()
    engine.drain()
    seqs.append(engine.add_request(_random_prompt(rng, 192, vocab), decode))
    batch = engine.scheduler.schedule()
    inp = ModelInput.build(batch, engine.cfg.block_size)
    assert len(inp.input_ids) == 256, len(inp.input_ids)
    result = {}
    graphs = runner.piecewise_graphs
    for mode in ("piecewise", "eager"):
        runner.piecewise_graphs = graphs if mode == "piecewise" else None
        times = []
        for _ in range(repeats + 3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            runner.run(inp)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        result[f"{mode}_ms"] = 1e3 * statistics.median(times[3:])
    runner.piecewise_graphs = graphs
    for s in seqs:
        engine.abort(s.rid)
    result["speedup"] = result["eager_ms"] / result["piecewise_ms"]
    return result


def hf_baseline(model_dir: str, lens: list[tuple[int, int]], batches: tuple[int, ...], device: str,
                chunk: int = 128) -> dict:
    """transformers' generate, bf16, with a static cache, which on GPU it compiles with torch.compile
    (its best settings): decode step latency and the offline workload (sequences sorted by output
    length and run `chunk` at a time, counting only wanted tokens).

    Each batch size gets one StaticCache of a fixed length, reused by every call, so torch.compile
    compiles once per batch size, in an untimed warm-up, and the timed calls are steady state.
    Warm-up seconds are reported apart."""
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    vocab = model.config.vocab_size
    rng = random.Random(0)
    caches: dict[tuple[int, int], StaticCache] = {}
    warmup_s = 0.0

    def generate(prompts: list[list[int]], new: int, cache_len: int) -> float:
        nonlocal warmup_s
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        key = (len(prompts), cache_len)

        def run(n: int) -> float:
            cache = caches[key]
            cache.reset()
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               past_key_values=cache)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        if key not in caches:
            caches[key] = StaticCache(config=model.config, max_cache_len=cache_len)
            warmup_s += run(4)  # compiles for this batch size and cache length
        return run(new)

    out = {"decode": []}
    for bs in batches:
        prompts = [_random_prompt(rng, 128, vocab) for _ in range(bs)]
        t_short, t_long = generate(prompts, 1, 256), generate(prompts, 33, 256)
        out["decode"].append({"batch": bs, "step_ms": 1e3 * (t_long - t_short) / 32})
    rng = random.Random(0)
    prompts = [(_random_prompt(rng, n_in, vocab), n_out) for n_in, n_out in lens]
    prompts.sort(key=lambda p: p[1])
    longest = max(n for n, _ in lens) + max(n for _, n in lens)  # a chunk pads its prompts to its longest
    t = 0.0
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        t += generate([p for p, _ in part], max(n for _, n in part), longest)
    wanted = sum(n for _, n in lens)
    out["offline"] = {"seconds": t, "output_tokens": wanted, "output_tok_s": wanted / t, "chunk": chunk}
    out["warmup_s"] = warmup_s
    return out


def bench_engine(cfg: EngineConfig, out_dir: str, num_seqs: int = 256, with_hf: bool = True) -> dict:
    rng = random.Random(0)
    lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(num_seqs)]
    engine = LLMEngine(cfg)
    device = engine.runner.device
    result = {"config": cfg.to_dict(), "num_seqs": num_seqs, "gpu": torch.cuda.get_device_name(device),
              "torch": torch.__version__, "pdl": pdl.enabled(device, 1),
              "graph_capture_s": engine.runner.timings.get("graph_capture_s")}
    try:
        bw = copy_bandwidth(device)
        result["copy_bandwidth_gbs"] = bw / 1e9
        result["decode"] = []
        for bs in DECODE_BATCHES:
            row = decode_latency(engine, bs)
            row["floor_ms"] = floor_ms(engine, bs, row["mean_context"], bw)
            row["over_floor"] = row["step_ms"] / row["floor_ms"]
            result["decode"].append(row)
            engine.flush_cache()
        result["batch1_sequential_ms"] = sequential_ms(engine)
        # The bar is on the batch-1 step: say how far one measurement of it can be trusted.
        result["batch1_repeats_ms"] = [decode_latency(engine, 1, profile=False)["step_ms"] for _ in range(5)]
        result["mixed_256"] = mixed_step(engine)
        engine.flush_cache()
        # Untimed first, as transformers' compile warm-up is: the same workload with other prompts, so
        # that every kernel the timed run needs is compiled, then the prefix cache is emptied so that the
        # timed run reuses nothing. Measured: the first run in a process is up to 1.5x slower; after a
        # 64-sequence warm-up, a fresh machine's first process still ran 13% slower than its second
        # (docs/benchmarks.md).
        result["offline_warmup"] = offline_throughput(engine, lens, seed=1)
        engine.flush_cache()
        result["offline"] = offline_throughput(engine, lens)
    finally:
        engine.shutdown()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"engine_tp{cfg.tp_size}_{cfg.resolved_graph_mode}.json"
    path.write_text(json.dumps(result, indent=1))  # kept even if the slow baseline below is cut off
    print(format_result(result), flush=True)
    if with_hf and cfg.tp_size == 1:
        result["transformers"] = hf_baseline(cfg.model, lens, DECODE_BATCHES, str(device))
        path.write_text(json.dumps(result, indent=1))
        print(format_result(result), flush=True)
    _plot(result, path.with_suffix(".png"))
    return result


def format_result(r: dict) -> str:
    c = r["config"]
    lines = [f"engine bench: {r['gpu']}, TP={c['tp_size']}, graph mode {c['graph_mode']}, "
             f"copy bandwidth {r['copy_bandwidth_gbs']:.0f} GB/s, graph capture {r['graph_capture_s']} s, "
             f"PDL {'on' if r.get('pdl') else 'off'}"]
    hf = {d["batch"]: d["step_ms"] for d in r.get("transformers", {}).get("decode", [])}
    lines.append(f"{'batch':>6} {'step ms':>9} {'fwd ms':>9} {'busy ms':>9} {'kernels':>8} {'floor ms':>9} "
                 f"{'x floor':>8} {'HF ms':>9}")
    for d in r["decode"]:
        h = f"{hf[d['batch']]:9.2f}" if d["batch"] in hf else f"{'-':>9}"
        fwd = f"{d['forward_ms']:9.2f}" if "forward_ms" in d else f"{'-':>9}"
        k = d.get("kernels") or {"busy_ms": float("nan"), "per_step": float("nan")}
        lines.append(f"{d['batch']:>6} {d['step_ms']:9.2f} {fwd} {k['busy_ms']:9.2f} {k['per_step']:8.0f} "
                     f"{d['floor_ms']:9.2f} {d['over_floor']:8.2f} {h}")
    top = r["decode"][0].get("kernels", {}).get("top", [])
    if top:
        lines.append(f"costliest kernels of a batch-{r['decode'][0]['batch']} step (per step):")
        lines += [f"  {t['us_per_step']:8.1f} us {t['per_step']:6.0f}x  {t['name']}" for t in top]
    host = r["decode"][0].get("host", [])
    if host:
        lines.append(f"driver's Python time in a batch-{r['decode'][0]['batch']} step (own us, cumulative us, calls):")
        lines += [f"  {h['own_us_per_step']:8.1f} {h['cum_us_per_step']:8.1f} {h['calls_per_step']:5.0f}x  "
                  f"{h['function']}" for h in host]
    if "batch1_sequential_ms" in r:
        lines.append(f"batch-1 step {r['decode'][0]['step_ms']:.2f} ms; without the overlap schedule "
                     f"{r['batch1_sequential_ms']:.2f} ms")
    if "batch1_repeats_ms" in r:
        reps = sorted(r["batch1_repeats_ms"])
        lines.append(f"batch-1 step measured {len(reps)} more times: median {statistics.median(reps):.3f} ms, "
                     f"range {reps[0]:.3f}-{reps[-1]:.3f} ms")
    m = r.get("mixed_256")
    if m:
        lines.append(f"mixed 256-token step: piecewise {m['piecewise_ms']:.2f} ms, eager {m['eager_ms']:.2f} ms "
                     f"({100 * (1 - m['piecewise_ms'] / m['eager_ms']):.0f}% less)")
    o = r["offline"]
    warm = f" (after an untimed warm-up: {r['offline_warmup']['seconds']:.1f} s)" if "offline_warmup" in r else ""
    lines.append(f"offline ({r['num_seqs']} seqs): {o['output_tok_s']:.0f} output tok/s, "
                 f"{o['total_tok_s']:.0f} total tok/s, {o['seconds']:.1f} s{warm}")
    if "transformers" in r:
        t = r["transformers"]["offline"]
        lines.append(f"transformers offline: {t['output_tok_s']:.0f} output tok/s ({t['seconds']:.1f} s, after "
                     f"{r['transformers']['warmup_s']:.0f} s of untimed compile warm-up); "
                     f"engine / transformers = {o['output_tok_s'] / t['output_tok_s']:.1f}x")
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    b = [d["batch"] for d in r["decode"]]
    ax.plot(b, [d["step_ms"] for d in r["decode"]], marker="o", label="tpfleet")
    ax.plot(b, [d["floor_ms"] for d in r["decode"]], ls="--", label="bandwidth floor")
    if "transformers" in r:
        ax.plot([d["batch"] for d in r["transformers"]["decode"]], [d["step_ms"] for d in r["transformers"]["decode"]],
                marker="s", label="transformers (static cache)")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode step (ms)",
           title=f"{r['gpu']}, TP={r['config']['tp_size']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
