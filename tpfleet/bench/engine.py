"""`tpfleet bench engine`: decode step time over batch sizes and contexts against its floor, offline
throughput, and their peers in the same run.

The floor of a decode step is the larger of two times, both from rates measured in the same run on
the same device: the bytes one rank must move (its weight shard once, the KV of every sequence's
context) over a large copy's bandwidth, and the operations it must do (2 x parameters x batch, plus
attention) over a large matmul's rate. The host's share of a step is the driver's time in the step
not spent blocked on the device's results (definition in `HOST_SHARE`). transformers' generate on the
same checkpoint runs after the engine has freed its memory. The mixed-batch measurement times one
256-token step (64 decodes plus a 192-token prefill chunk) with piecewise graphs and eagerly.
"""

from __future__ import annotations

import gc
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tpfleet.config import EngineConfig
from tpfleet.engine import llm_engine
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import OutputOptions, SamplingParams
from tpfleet.engine.step_input import ModelInput
from tpfleet.kernels import pdl

DECODE_BATCHES = (1, 8, 64, 256, 512)
DECODE_CONTEXTS = (128, 1024, 4096, 8192)
HF_CONTEXT = 128  # transformers' decode steps are timed with prompts of this length
HOST_SHARE = ("host_ms: per step, the driver's wall time in LLMEngine.step() minus the time it sat blocked "
              "waiting for the device's results at read-back; host_share = host_ms / step_ms. Near 1 the "
              "device waits for the host; on CPU the forward runs on the host, so the share is 1 by definition.")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(op: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median time of `op` on `device`: CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        op()
    sync_device(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            op()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            op()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second of a large copy on `device`, counting bytes read plus bytes written. 4 GiB on a
    GPU; 256 MiB on the CPU, well past its caches."""
    nbytes = nbytes or (4 << 30 if device.type == "cuda" else 256 << 20)

    def timed() -> float:
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        return _median_seconds(lambda: dst.copy_(src), device)

    seconds = timed()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Operations per second of one large square matmul on random data, in the engine's dtype: 8192
    on a GPU (its tensor cores' practical peak), 512 on the CPU."""
    n = n or (8192 if device.type == "cuda" else 512)

    def timed() -> float:
        left = torch.randn(n, n, device=device).to(dtype)
        right = torch.randn(n, n, device=device).to(dtype)
        return _median_seconds(lambda: left @ right, device)

    seconds = timed()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n ** 3 / seconds


def free_device_memory(device: torch.device) -> dict:
    """Collect garbage and give cached blocks back, then say what the device has free: run once an
    engine is gone and before the next user of the device starts."""
    gc.collect()
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return {"free_gib": free / 2**30, "total_gib": total / 2**30}


@contextmanager
def device_wait_clock() -> Iterator[list[float]]:
    """Sum, in [0], the seconds the driver sits blocked on a step's results at read-back (the one
    place a step waits for the device): the rest of a step's wall time is host work."""
    waited = [0.0]
    original = llm_engine.InFlightStep.host_results

    def timed(step: llm_engine.InFlightStep) -> dict[str, list]:
        if step.copied is not None:
            t = time.perf_counter()
            step.copied.synchronize()
            waited[0] += time.perf_counter() - t
        return original(step)

    llm_engine.InFlightStep.host_results = timed
    try:
        yield waited
    finally:
        llm_engine.InFlightStep.host_results = original


def _random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def decode_latency(engine: LLMEngine, bs: int, context: int = 128, steps: int = 32, overlap: bool = True,
                   profile: bool = True, host_top: bool = False) -> dict:
    """The step time of `bs` sequences decoding around `context` tokens each (prompts of distinct
    random tokens: nothing shared through the prefix cache), and the host's share of it."""
    device = engine.runner.device
    prompt_len = prompt_len_for(context, steps)
    rng = random.Random(bs * 100_003 + context)
    vocab = engine.model_config.vocab_size
    # The first prompts decode while later ones still prefill: none may stop before the timed steps end
    # (every one is aborted after them).
    params = SamplingParams(max_new_tokens=engine.max_seq_len - prompt_len, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(_random_prompt(rng, prompt_len, vocab), params) for _ in range(bs)]
    while any(s.num_completion_tokens == 0 for s in seqs):
        engine.step()
    # Steps back to back, as a serving loop runs them: under the overlap schedule a step's host work
    # hides behind the GPU work of the one before, so only the loop's total time says what a step costs.
    engine.drain()
    sync_device(device)
    tokens_before = sum(len(s.token_ids) for s in seqs)
    with device_wait_clock() as waited:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
            if not overlap:
                engine.drain()  # each step read back before the next is launched
        engine.drain()
        seconds = time.perf_counter() - t
    decoded = sum(len(s.token_ids) for s in seqs) - tokens_before
    if decoded != bs * steps:
        raise RuntimeError(f"batch {bs} context {context}: {decoded} tokens decoded in {steps} steps, not "
                           f"{bs * steps}: the batch did not stay whole (finished or preempted sequences)")
    row = {"batch": bs, "context": context, "step_ms": 1e3 * seconds / steps,
           "mean_context": (2 * tokens_before + decoded) / (2 * bs), "tokens_per_s": bs * steps / seconds,
           "host_ms": 1e3 * (seconds - waited[0]) / steps}
    row["host_share"] = row["host_ms"] / row["step_ms"]
    if host_top:
        row["host_top"] = host_profile(engine)
    if device.type == "cuda" and profile:
        row["kernels"] = kernel_profile(engine)
        if engine.cfg.tp_size == 1:
            row["forward_ms"] = forward_ms(engine)
    for s in seqs:
        engine.abort(s.rid)
    return row


EXTRA_STEPS = 64  # decode steps a point may run past its timed ones: profiler, host profile, read-back lag


def prompt_len_for(context: int, steps: int) -> int:
    """The prompt that puts the middle of the timed steps at `context` tokens."""
    return max(1, context - 1 - steps // 2)


def prefill_steps(engine: LLMEngine, bs: int, prompt_len: int) -> int | None:
    """At most the steps that `bs` prompts of `prompt_len` tokens take to prefill, when the prompts
    already prefilled decode beside them (a token each of the step budget); None if they could leave
    no room for prefill at all."""
    room = engine.cfg.max_num_batched_tokens - bs
    return -(-bs * prompt_len // room) + 1 if room > 0 else None


def why_not_fits(engine: LLMEngine, bs: int, context: int, steps: int) -> str | None:
    """Why `bs` sequences at `context` cannot all be resident for the whole measurement, or None. The
    first prompts decode while the last prefill, so a sequence may run up to prefill_steps ahead."""
    block = engine.cfg.block_size
    prompt_len = prompt_len_for(context, steps)
    lead = prefill_steps(engine, bs, prompt_len)
    if lead is None:
        return (f"a step budget of {engine.cfg.max_num_batched_tokens} tokens leaves no room to prefill beside "
                f"{bs} decodes")
    tokens = prompt_len + lead + steps + EXTRA_STEPS
    if bs > engine.cfg.max_num_seqs:
        return f"batch {bs} exceeds max_num_seqs {engine.cfg.max_num_seqs}"
    if tokens > engine.max_seq_len:
        return f"{tokens} tokens per sequence exceed the context the engine holds ({engine.max_seq_len})"
    needed = bs * -(-tokens // block)
    if needed > engine.block_manager.num_blocks:
        return (f"KV cache too small: {bs} x {tokens} tokens need {needed * block} KV tokens, "
                f"the engine holds {engine.block_manager.num_blocks * block}")
    return None


def sequential_ms(engine: LLMEngine, context: int, steps: int = 32) -> float:
    """The batch-1 step with every step read back before the next is launched, same process: what
    the overlap schedule buys."""
    return decode_latency(engine, 1, context, steps, overlap=False, profile=False)["step_ms"]


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
        sync_device(engine.runner.device)
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
            rows.append(row)
            print(f"batch {bs:4d}: {row['step_ms']:8.2f} ms/step  {row['tokens_per_s']:10.1f} tokens/s", flush=True)
            engine.flush_cache()
        return rows
    finally:
        engine.shutdown()


@dataclass(frozen=True)
class StepCost:
    """What one rank's model reads and computes, apart from the batch: the parts of a floor. Weights are
    those a token multiplies by, experts apart; an untied embedding table is left out (a step reads
    only its tokens' rows)."""
    weight_params: int
    weight_bytes: int
    expert_params: int
    expert_bytes: int
    expert_share: float  # top-k over the experts: the share of expert weights one token uses
    kv_bytes_per_token: int  # K and V of one context token, every layer
    attention_ops_per_token: int  # a query against one context token, every layer: 4 per head dimension

    @classmethod
    def of(cls, engine: LLMEngine) -> StepCost:
        model, mcfg = engine.runner.model, engine.model_config
        sizes = {"weights": [0, 0], "experts": [0, 0]}
        for name, p in model.named_parameters():
            if p is model.embed_tokens.weight and p is not model.lm_head.weight:
                continue
            part = sizes["experts" if ".experts." in name else "weights"]
            part[0] += p.numel()
            part[1] += p.numel() * p.element_size()
        attn = model.layers[0].self_attn
        layers = len(model.layers)
        return cls(*sizes["weights"], *sizes["experts"],
                   mcfg.num_experts_per_tok / mcfg.num_experts if mcfg.num_experts else 0.0,
                   2 * attn.num_kv_heads * attn.head_dim * engine.runner.dtype.itemsize * layers,
                   4 * attn.num_heads * attn.head_dim * layers)

    def decode(self, bs: int, context_tokens: float, bandwidth: float, matmul_rate: float) -> dict:
        """A decode step of `bs` sequences holding `context_tokens` in all. MoE: the expert weights count
        by the share of experts a batch is expected to touch (uniform routing); operations by the top-k
        experts each token uses."""
        touched = 1 - (1 - self.expert_share) ** bs
        kv_bytes = context_tokens * self.kv_bytes_per_token
        bytes_moved = self.weight_bytes + self.expert_bytes * touched + kv_bytes
        ops = 2 * (self.weight_params + self.expert_params * self.expert_share) * bs + \
            self.attention_ops_per_token * context_tokens
        return bound(bytes_moved, ops, bandwidth, matmul_rate, kv_bytes=kv_bytes)

    def prefill(self, prompts: list[int], bandwidth: float, matmul_rate: float) -> dict:
        """Every prompt in one pass: each weight read once (every expert), each token multiplied by its
        weights, each causal attention pair computed once."""
        ops = 2 * (self.weight_params + self.expert_params * self.expert_share) * sum(prompts) + \
            self.attention_ops_per_token * sum(n * (n + 1) / 2 for n in prompts)
        return bound(self.weight_bytes + self.expert_bytes, ops, bandwidth, matmul_rate)


def bound(bytes_moved: float, ops: float, bandwidth: float, matmul_rate: float, **extra) -> dict:
    """The floor of work that moves `bytes_moved` and computes `ops`: the larger of the two times, in ms."""
    memory_ms, compute_ms = 1e3 * bytes_moved / bandwidth, 1e3 * ops / matmul_rate
    return {"bytes": bytes_moved, **extra, "ops": ops, "memory_ms": memory_ms, "compute_ms": compute_ms,
            "floor_ms": max(memory_ms, compute_ms), "bound": "memory" if memory_ms >= compute_ms else "compute"}


def floor(engine: LLMEngine, bs: int, context: float, bandwidth: float, matmul_rate: float) -> dict:
    """The least time one rank needs for a decode step of `bs` sequences at `context` tokens: the
    larger of its bytes over the copy bandwidth and its operations over the matmul rate (StepCost)."""
    return StepCost.of(engine).decode(bs, bs * context, bandwidth, matmul_rate)


def offline_floor(cost: StepCost, lens: list[tuple[int, int]], rates: dict) -> dict:
    """The least time the offline workload needs: every prompt prefilled in one compute pass, then one
    decode step per output token after the first, each holding the sequences still generating at their
    context then, each step at its floor. What no schedule or kernel can beat on this card."""
    bandwidth, rate = rates["copy_bandwidth_gbs"] * 1e9, rates["matmul_tflops"] * 1e12
    prefill_s = cost.prefill([n for n, _ in lens], bandwidth, rate)["floor_ms"] / 1e3
    decode_s, steps = 0.0, 0
    for k in range(1, max(n for _, n in lens)):
        live = [n_in + k for n_in, n_out in lens if n_out > k]
        decode_s += cost.decode(len(live), sum(live), bandwidth, rate)["floor_ms"] / 1e3
        steps += 1
    output = sum(n for _, n in lens)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
            "output_tok_s": output / (prefill_s + decode_s)}


def decode_sweep(engine: LLMEngine, batches: list[int], contexts: list[int], rates: dict,
                 steps: int = 32) -> list[dict]:
    """Every (batch, context) point that fits; those that do not are listed with the reason. An
    untimed batch-1 point first: the first steps of a process pay for lazy initialisation."""
    if contexts and why_not_fits(engine, 1, contexts[0], steps) is None:
        decode_latency(engine, 1, contexts[0], steps, profile=False)
        engine.flush_cache()
    rows = []
    for context in contexts:
        for bs in batches:
            reason = why_not_fits(engine, bs, context, steps)
            if reason is not None:
                rows.append({"batch": bs, "context": context, "skipped": reason})
                print(f"batch {bs:4d} context {context:5d}: skipped: {reason}", flush=True)
                continue
            row = decode_latency(engine, bs, context, steps, host_top=context == contexts[0])
            row["floor"] = floor(engine, bs, row["mean_context"], rates["copy_bandwidth_gbs"] * 1e9,
                                 rates["matmul_tflops"] * 1e12)
            row["floor_ms"] = row["floor"]["floor_ms"]
            row["over_floor"] = row["step_ms"] / row["floor_ms"]
            rows.append(row)
            print(f"batch {bs:4d} context {context:5d}: {row['step_ms']:8.2f} ms/step, floor {row['floor_ms']:.3f} ms "
                  f"({row['floor']['bound']}), {row['over_floor']:.2f}x floor, host share {row['host_share']:.2f}",
                  flush=True)
            engine.flush_cache()
    return rows


def offline_throughput(engine: LLMEngine, lens: list[tuple[int, int]], seed: int = 0,
                       return_logprob: bool = False) -> dict:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    options = OutputOptions(return_logprob=return_logprob)
    seqs = []
    sync_device(engine.runner.device)
    t = time.perf_counter()
    for n_in, n_out in lens:
        seqs.append(engine.add_request(_random_prompt(rng, n_in, vocab),
                                       SamplingParams(max_new_tokens=n_out, temperature=0.0, ignore_eos=True),
                                       options=options))
    # Under the overlap schedule a step() waits for the step launched by the call before it, so each
    # call's wall time is charged to that step: steps with prompt tokens against pure decode steps.
    kinds = {kind: {"steps": 0, "seconds": 0.0, "tokens": 0} for kind in ("prefill", "decode")}
    launched = None
    while engine.has_work():
        start = time.perf_counter()
        engine.step()
        if launched is not None:
            launched["steps"] += 1
            launched["seconds"] += time.perf_counter() - start
        flight = engine.in_flight
        launched = None
        if flight is not None:
            launched = kinds["prefill" if any(s.num_tokens > 1 for s in flight.batch) else "decode"]
            launched["tokens"] += sum(s.num_tokens for s in flight.batch)
    dt = time.perf_counter() - t
    out = sum(s.num_completion_tokens for s in seqs)
    result = {"seconds": dt, "output_tokens": out, "output_tok_s": out / dt,
              "total_tok_s": (out + sum(n for n, _ in lens)) / dt, "return_logprob": return_logprob}
    if engine.cfg.overlap_schedule:
        result["steps"] = kinds
    return result


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


def hf_experts_implementations() -> list[str]:
    """The experts implementations this transformers offers an MoE model (`bench engine --hf-experts`)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without the choice: its experts are one loop
        return []
    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def hf_baseline(model_dir: str, lens: list[tuple[int, int]], batches: tuple[int, ...], device: str,
                chunk: int = 128, random_weights: bool = False, record=lambda out: None,
                experts: str | None = None) -> dict:
    """transformers' generate, bf16, with a static cache, which on GPU it compiles with torch.compile
    (its best settings): decode step latency and the offline workload (sequences sorted by output
    length and run `chunk` at a time, counting only wanted tokens).

    Each batch size gets one StaticCache of a fixed length, reused by every call, so torch.compile
    compiles once per batch size, in an untimed warm-up, and the timed calls are steady state.
    Warm-up seconds are reported apart. `random_weights` (the engine ran with load_format 'dummy'):
    the model built from config.json alone, initialised by transformers; every output is as long as
    asked, so the values of the weights change no timing.

    The offline workload runs first (the bar is on it) and `record` gets the result so far after every
    chunk and decode point: a baseline cut off by a time limit keeps what it measured, its offline figure
    marked incomplete.

    `experts`: transformers' experts_implementation for an MoE model ("grouped_mm": one grouped GEMM per
    projection; "eager": a loop over the experts); None leaves transformers' own default. The one that
    ran is recorded."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

    extra = {"experts_implementation": experts} if experts else {}
    if random_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16,
                                                     **extra)
        model = model.eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **extra).to(device).eval()
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

    out = {"decode": [], "transformers_version": transformers.__version__,
           "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    prompts = [(_random_prompt(rng, n_in, vocab), n_out) for n_in, n_out in lens]
    prompts.sort(key=lambda p: p[1])
    longest = max(n for n, _ in lens) + max(n for _, n in lens)  # a chunk pads its prompts to its longest
    t, done = 0.0, 0
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        t += generate([p for p, _ in part], max(n for _, n in part), longest)
        done += sum(n for _, n in part)
        out["offline"] = {"seconds": t, "output_tokens": done, "output_tok_s": done / t, "chunk": chunk,
                          "sequences": i + len(part), "complete": i + len(part) == len(prompts)}
        out["warmup_s"] = warmup_s
        print(f"transformers offline: {i + len(part)} of {len(prompts)} sequences, {done} output tokens in "
              f"{t:.1f} s (compile warm-ups {warmup_s:.1f} s)", flush=True)
        record(out)
    for bs in batches:
        prompts = [_random_prompt(rng, HF_CONTEXT, vocab) for _ in range(bs)]
        t_short, t_long = generate(prompts, 1, 256), generate(prompts, 33, 256)
        out["decode"].append({"batch": bs, "step_ms": 1e3 * (t_long - t_short) / 32})
        out["warmup_s"] = warmup_s
        record(out)
    return out


def measure_rates(device: torch.device, dtype: torch.dtype) -> dict:
    rates = {"copy_bandwidth_gbs": copy_bandwidth(device) / 1e9, "matmul_tflops": matmul_rate(device, dtype) / 1e12,
             "matmul_dtype": str(dtype).removeprefix("torch.")}
    if device.type != "cuda":
        rates["note"] = "measured on the CPU with small buffers: the floor is indicative only"
    return rates


def offline_lens(num_seqs: int, max_len: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths of the offline workload, each uniform in [max_len / 10, max_len]."""
    rng = random.Random(seed)
    low = max(1, max_len // 10)
    return [(rng.randint(low, max_len), rng.randint(low, max_len)) for _ in range(num_seqs)]


def _engine_part(cfg: EngineConfig, lens: list[tuple[int, int]], batches: list[int], contexts: list[int],
                 steps: int, logprobs: str) -> tuple[dict, torch.device]:
    """Everything measured on the engine; the engine is gone when this returns."""
    engine = LLMEngine(cfg)
    device = engine.runner.device
    result = {"config": cfg.to_dict(), "num_seqs": len(lens), "gpu": device_name(device),
              "torch": torch.__version__, "pdl": pdl.enabled(device, 1),
              "graph_capture_s": engine.runner.timings.get("graph_capture_s"), "host_share_definition": HOST_SHARE}
    if device.type != "cuda":
        result["notes"] = ["CPU run: no CUDA profiler kernel breakdown, no forward-only time, no mixed-step "
                           "graph comparison; copy bandwidth and matmul rate measured on the CPU"]
    try:
        result["rates"] = measure_rates(device, engine.runner.dtype)
        result["copy_bandwidth_gbs"] = result["rates"]["copy_bandwidth_gbs"]
        result["decode"] = decode_sweep(engine, batches, contexts, result["rates"], steps)
        batch1 = [d["context"] for d in result["decode"] if d["batch"] == 1 and "skipped" not in d]
        if batch1:
            context = batch1[0]
            result["batch1_sequential_ms"] = sequential_ms(engine, context, steps)
            # The bar is on the batch-1 step: say how far one measurement of it can be trusted.
            result["batch1_repeats_ms"] = [decode_latency(engine, 1, context, steps, profile=False)["step_ms"]
                                           for _ in range(5)]
        result["mixed_256"] = mixed_step(engine)
        engine.flush_cache()
        if lens:
            # Untimed first, as transformers' compile warm-up is: the same workload with other prompts, so
            # that every kernel the timed run needs is compiled, then the prefix cache is emptied so that
            # the timed run reuses nothing. Measured: the first run in a process is up to 1.5x slower;
            # after a 64-sequence warm-up, a fresh machine's first process still ran 13% slower than its
            # second (docs/benchmarks.md).
            result["offline_warmup"] = offline_throughput(engine, lens, seed=1)
            engine.flush_cache()
            result["offline"] = offline_throughput(engine, lens, return_logprob=logprobs == "on")
            result["offline_floor"] = offline_floor(StepCost.of(engine), lens, result["rates"])
            if logprobs == "both":
                engine.flush_cache()
                result["offline_logprob"] = offline_throughput(engine, lens, return_logprob=True)
                with_logprobs, without = result["offline_logprob"], result["offline"]
                result["logprob_cost"] = 1 - with_logprobs["output_tok_s"] / without["output_tok_s"]
    finally:
        engine.shutdown()
    return result, device


def bench_engine(cfg: EngineConfig, out_dir: str, num_seqs: int = 256, with_hf: bool = True,
                 batches: list[int] = DECODE_BATCHES, contexts: list[int] = DECODE_CONTEXTS, steps: int = 32,
                 logprobs: str = "both", offline_max_len: int = 1024, hf_chunk: int = 128,
                 hf_experts: str | None = None) -> dict:
    lens = offline_lens(num_seqs, offline_max_len)
    result, device = _engine_part(cfg, lens, list(batches), list(contexts), steps, logprobs)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"engine_tp{cfg.tp_size}_{cfg.resolved_graph_mode}.json"
    path.write_text(json.dumps(result, indent=1))  # kept even if the slow baseline below is cut off
    print(format_result(result), flush=True)
    why_no_hf = ("not asked for" if not with_hf else "TP=1 only" if cfg.tp_size > 1
                 else "GPU only (its compiled static-cache path)" if device.type != "cuda"
                 else "no offline workload" if not lens else None)
    if why_no_hf is None:
        # The engine is gone: transformers gets the whole card, so the baseline fits on an 80 GB one.
        memory = free_device_memory(device)
        memory["checkpoint_gib"] = sum(f.stat().st_size for f in Path(cfg.model).glob("*.safetensors")) / 2**30
        result["memory_before_transformers"] = memory
        print(f"before the transformers baseline: {memory['free_gib']:.1f} of {memory['total_gib']:.1f} GiB free, "
              f"checkpoint {memory['checkpoint_gib']:.1f} GiB", flush=True)
        decode_batches = sorted({d["batch"] for d in result["decode"] if "skipped" not in d})

        def record(hf: dict) -> None:
            result["transformers"] = hf
            path.write_text(json.dumps(result, indent=1))

        hf_baseline(cfg.model, lens, tuple(decode_batches), str(device), hf_chunk,
                    random_weights=cfg.load_format == "dummy", record=record, experts=hf_experts)
        print(format_result(result), flush=True)
    else:
        result["transformers_skipped"] = why_no_hf
        path.write_text(json.dumps(result, indent=1))
        print(f"transformers baseline skipped: {why_no_hf}", flush=True)
    result["json"] = str(path)
    _plot(result, path.with_suffix(".png"))
    return result


def format_result(r: dict) -> str:
    c = r["config"]
    rates = r["rates"]
    lines = [f"engine bench: {r['gpu']}, TP={c['tp_size']}, graph mode {c['graph_mode']}, "
             f"copy bandwidth {rates['copy_bandwidth_gbs']:.0f} GB/s, {rates['matmul_dtype']} matmul "
             f"{rates['matmul_tflops']:.3g} TFLOP/s, graph capture {r['graph_capture_s']} s, "
             f"PDL {'on' if r.get('pdl') else 'off'}"]
    lines += [f"note: {n}" for n in r.get("notes", []) + ([rates["note"]] if "note" in rates else [])]
    lines.append(f"host share: {r['host_share_definition']}")
    hf = {d["batch"]: d["step_ms"] for d in r.get("transformers", {}).get("decode", [])}
    if hf:
        lines.append(f"HF ms: transformers' decode step at context {HF_CONTEXT}")
    lines.append(f"{'batch':>6} {'context':>7} {'step ms':>9} {'host ms':>8} {'host %':>6} {'fwd ms':>8} "
                 f"{'busy ms':>8} {'kernels':>7} {'floor ms':>9} {'bound':>7} {'x floor':>8} {'HF ms':>8}")
    for d in r["decode"]:
        if "skipped" in d:
            lines.append(f"{d['batch']:>6} {d['context']:>7}  skipped: {d['skipped']}")
            continue
        h = f"{hf[d['batch']]:8.2f}" if d["batch"] in hf and d["context"] == HF_CONTEXT else f"{'-':>8}"
        fwd = f"{d['forward_ms']:8.2f}" if "forward_ms" in d else f"{'-':>8}"
        k = d.get("kernels")
        busy = f"{k['busy_ms']:8.2f} {k['per_step']:7.0f}" if k else f"{'-':>8} {'-':>7}"
        lines.append(f"{d['batch']:>6} {d['context']:>7} {d['step_ms']:9.2f} {d['host_ms']:8.2f} "
                     f"{100 * d['host_share']:5.0f}% {fwd} {busy} {d['floor_ms']:9.3f} {d['floor']['bound']:>7} "
                     f"{d['over_floor']:8.2f} {h}")
    for d in r["decode"]:
        top = d.get("kernels", {}).get("top", [])[:5]
        if top:
            lines.append(f"costliest kernels, batch {d['batch']} context {d['context']} (per step):")
            lines += [f"  {t['us_per_step']:8.1f} us {t['per_step']:6.0f}x  {t['name']}" for t in top]
    for d in r["decode"]:
        if "host_top" in d:
            lines.append(f"driver's Python time in a step, batch {d['batch']} context {d['context']} "
                         "(own us, cumulative us, calls):")
            lines += [f"  {h['own_us_per_step']:8.1f} {h['cum_us_per_step']:8.1f} {h['calls_per_step']:5.0f}x  "
                      f"{h['function']}" for h in d["host_top"][:10]]
    if "batch1_sequential_ms" in r:
        first = next(d for d in r["decode"] if d["batch"] == 1 and "skipped" not in d)
        lines.append(f"batch-1 step {first['step_ms']:.2f} ms; without the overlap schedule "
                     f"{r['batch1_sequential_ms']:.2f} ms")
    if "batch1_repeats_ms" in r:
        reps = sorted(r["batch1_repeats_ms"])
        lines.append(f"batch-1 step measured {len(reps)} more times: median {statistics.median(reps):.3f} ms, "
                     f"range {reps[0]:.3f}-{reps[-1]:.3f} ms")
    m = r.get("mixed_256")
    if m:
        lines.append(f"mixed 256-token step: piecewise {m['piecewise_ms']:.2f} ms, eager {m['eager_ms']:.2f} ms "
                     f"({100 * (1 - m['piecewise_ms'] / m['eager_ms']):.0f}% less)")
    if "offline" in r:
        o = r["offline"]
        warm = f" (after an untimed warm-up: {r['offline_warmup']['seconds']:.1f} s)" if "offline_warmup" in r else ""
        lines.append(f"offline ({r['num_seqs']} seqs, return_logprob {o['return_logprob']}): {o['output_tok_s']:.0f} "
                     f"output tok/s, {o['total_tok_s']:.0f} total tok/s, {o['seconds']:.1f} s{warm}")
        f = r["offline_floor"]
        lines.append(f"  floor {f['output_tok_s']:.0f} output tok/s (prefill {f['prefill_s']:.2f} s, "
                     f"{f['decode_steps']} decode steps {f['decode_s']:.2f} s): measured at "
                     f"{o['output_tok_s'] / f['output_tok_s']:.2f} of it")
        for kind, k in o.get("steps", {}).items():
            if k["steps"]:
                lines.append(f"  {kind} steps: {k['steps']}, {k['seconds']:.2f} s, {k['tokens']} tokens, "
                             f"{1e3 * k['seconds'] / k['steps']:.2f} ms and {k['tokens'] / k['steps']:.0f} "
                             "tokens a step")
    if "offline_logprob" in r:
        lines.append(f"offline with return_logprob: {r['offline_logprob']['output_tok_s']:.0f} output tok/s; "
                     f"logprobs cost {100 * r['logprob_cost']:.1f}% of throughput")
    if "transformers" in r:
        t = r["transformers"]["offline"]
        part = "" if t.get("complete", True) else f", incomplete: {t['sequences']} of {r['num_seqs']} sequences"
        experts = r["transformers"].get("experts_implementation")
        part += f", experts {experts}" if experts else ""
        lines.append(f"transformers offline: {t['output_tok_s']:.0f} output tok/s ({t['seconds']:.1f} s{part}, after "
                     f"{r['transformers']['warmup_s']:.0f} s of untimed compile warm-up); "
                     f"engine / transformers = {r['offline']['output_tok_s'] / t['output_tok_s']:.1f}x")
    elif "transformers_skipped" in r:
        lines.append(f"transformers baseline skipped: {r['transformers_skipped']}")
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = [d for d in r["decode"] if "skipped" not in d]
    for context in sorted({d["context"] for d in measured}):
        points = [d for d in measured if d["context"] == context]
        line, = ax.plot([d["batch"] for d in points], [d["step_ms"] for d in points], marker="o",
                        label=f"tpfleet, context {context}")
        ax.plot([d["batch"] for d in points], [d["floor_ms"] for d in points], ls="--", color=line.get_color())
    if "transformers" in r:
        ax.plot([d["batch"] for d in r["transformers"]["decode"]], [d["step_ms"] for d in r["transformers"]["decode"]],
                marker="s", color="black", label="transformers (static cache)")
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode step (ms); dashed: floor",
           title=f"{r['gpu']}, TP={r['config']['tp_size']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
