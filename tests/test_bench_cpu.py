"""The benchmarks' CPU paths on the tiny model: `bench engine` (the decode sweep with its floor and the
host's share, the RL rollout workload in-process and over HTTP) and `bench start`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tpfleet.bench.engine import StepCost, offline_floor, offline_lens
from tpfleet.bench.start import bench_start
from tpfleet.bench.workloads import RLWorkload, bench_rl
from tpfleet.config import EngineConfig
from tpfleet.phases import PHASES, process_start_time


def test_bench_engine_cli_reports_every_point_against_its_floor(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "tpfleet.cli", "bench", "engine", "--model", str(tiny_model), "--device", "cpu",
           "--kv-cache-tokens", "2048", "--batches", "1,2", "--contexts", "16,8192", "--decode-steps", "4",
           "--num-seqs", "2", "--offline-max-len", "16", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "engine_tp1_eager.json").read_text())
    assert result["rates"]["copy_bandwidth_gbs"] > 0 and result["rates"]["matmul_tflops"] > 0
    measured = [d for d in result["decode"] if "skipped" not in d]
    skipped = [d for d in result["decode"] if "skipped" in d]
    assert [(d["batch"], d["context"]) for d in measured] == [(1, 16), (2, 16)]
    # The tiny model holds 4096 positions: 8192 cannot fit, and the reason says so.
    assert [(d["batch"], d["context"]) for d in skipped] == [(1, 8192), (2, 8192)]
    assert all("context" in d["skipped"] for d in skipped)
    for d in measured:
        floor = d["floor"]
        assert d["step_ms"] > 0 and floor["floor_ms"] > 0 and d["over_floor"] > 0
        assert floor["floor_ms"] == max(floor["memory_ms"], floor["compute_ms"])
        assert math.isclose(d["over_floor"], d["step_ms"] / d["floor_ms"])
        # tiny: 2 layers, 2 KV heads of 32, float32: K and V of every context token of every sequence
        assert floor["kv_bytes"] == d["batch"] * d["mean_context"] * 2 * 2 * 32 * 4 * 2
        assert 0 < d["host_ms"] <= d["step_ms"] * 1.000001 and 0 < d["host_share"] <= 1.000001
    assert measured[1]["floor"]["ops"] > measured[0]["floor"]["ops"]
    assert "host_top" in measured[0] and "read-back" in result["host_share_definition"]
    for key in ("offline", "offline_logprob"):
        assert result[key]["output_tokens"] > 0 and result[key]["output_tok_s"] > 0
    assert result["offline_logprob"]["return_logprob"] and not result["offline"]["return_logprob"]
    # Every prompt token and every decoded token is counted once, in a step of its kind.
    steps = result["offline"]["steps"]
    prompt_tokens = result["offline"]["total_tok_s"] * result["offline"]["seconds"] - result["offline"]["output_tokens"]
    # A sequence's last token is never fed back.
    assert steps["prefill"]["tokens"] + steps["decode"]["tokens"] == round(prompt_tokens) + \
        result["offline"]["output_tokens"] - result["num_seqs"]
    assert steps["decode"]["steps"] > 0 and steps["prefill"]["steps"] > 0
    assert all(k["seconds"] > 0 for k in steps.values())
    # One decode step per output token after the first, up to the longest output; nothing beats the floor.
    floor = result["offline_floor"]
    assert floor["decode_steps"] == max(n for _, n in offline_lens(2, 16)) - 1
    assert floor["prefill_s"] > 0 and floor["decode_s"] > 0
    assert floor["output_tok_s"] > result["offline"]["output_tok_s"]
    assert math.isfinite(result["logprob_cost"])
    assert "GPU only" in result["transformers_skipped"]


def test_offline_floor_sums_a_prefill_pass_and_each_decode_step_at_its_bound():
    # 1000 weights of 1 byte, one expert weight in four used per token, 10 KV bytes and 4 operations per
    # context token; 1 byte/s and 1 op/s, so every time below is a count.
    cost = StepCost(weight_params=1000, weight_bytes=1000, expert_params=400, expert_bytes=400, expert_share=0.25,
                    kv_bytes_per_token=10, attention_ops_per_token=4)
    rates = {"copy_bandwidth_gbs": 1e-9, "matmul_tflops": 1e-12}
    # Prompts of 3 and 2 tokens, outputs of 3 and 1: the second is done after its prefill.
    floor = offline_floor(cost, [(3, 3), (2, 1)], rates)
    # Prefill: max(1400 bytes, 2 x 1100 x 5 tokens + 4 x (6 + 3) pairs = 11036 ops).
    assert math.isclose(floor["prefill_s"], 11036)
    # Decode steps 1 and 2 hold the first sequence at contexts 4 and 5: max(bytes, ops) each, where one
    # sequence touches a quarter of the experts: 1000 + 100 + 10 x context bytes against 2200 + 4 x context.
    assert floor["decode_steps"] == 2
    assert math.isclose(floor["decode_s"], max(1140, 2216) + max(1150, 2220))
    assert math.isclose(floor["output_tok_s"], 4 / (11036 + 2216 + 2220))
    # Memory-bound when the context is long: the KV bytes win.
    step = cost.decode(1, 1000, bandwidth=1.0, matmul_rate=1.0)
    assert step["bound"] == "memory" and step["kv_bytes"] == 10000 and step["floor_ms"] == 1e3 * 11100


def test_bench_engine_refuses_an_empty_transformers_chunk(tiny_model):
    cmd = [sys.executable, "-m", "tpfleet.cli", "bench", "engine", "--model", str(tiny_model), "--hf-chunk", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--hf-chunk: expected a positive count, got 0" in run.stderr


def test_bench_engine_refuses_an_experts_implementation_transformers_lacks(tiny_model):
    """Checked before the engine's part runs, not minutes later when transformers builds its model."""
    from tpfleet.bench.engine import hf_experts_implementations

    offered = ", ".join(hf_experts_implementations()) or "no choice"
    cmd = [sys.executable, "-m", "tpfleet.cli", "bench", "engine", "--model", str(tiny_model), "--hf-experts", "loop"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--hf-experts: this transformers offers {offered}, not 'loop'" in run.stderr


def test_rl_workload_draws_groups_of_one_prompt_with_long_tailed_lengths():
    workload = RLWorkload(prompts=50, samples=4, min_prompt=5, max_prompt=9, max_output=64)
    requests = workload.requests(vocab=100)
    assert len(requests) == 200 and requests == workload.requests(vocab=100)
    for group in range(50):
        prompts = [p for p, _ in requests[4 * group:4 * group + 4]]
        assert all(p == prompts[0] for p in prompts) and 5 <= len(prompts[0]) <= 9
    lengths = [n for _, n in requests]
    assert min(lengths) >= 16 and max(lengths) <= 64
    assert lengths.count(64) >= 1 and len(set(lengths)) > 10  # a spread, with some at the cap


def test_rl_workload_finishes_every_request_in_process_and_over_http(tiny_model, tmp_path):
    cfg = EngineConfig(model=str(tiny_model), device="cpu", kv_cache_tokens=4096)
    workload = RLWorkload(prompts=3, samples=2, min_prompt=20, max_prompt=40, max_output=24)
    result = bench_rl(cfg, str(tmp_path), workload)
    for key in ("in_process", "in_process_no_logprob", "http"):
        run = result[key]
        assert run["complete"] and run["requests"] == 6 and run["output_tokens"] == result["wanted_output_tokens"]
        assert len(run["finish_s"]) == 6 and run["tail_s"] == max(run["finish_s"])
        assert all(0 < t <= run["tail_s"] <= run["seconds"] for t in run["finish_s"])
    assert result["in_process"]["logprobs_complete"] and result["http"]["logprobs_complete"]
    assert result["http"]["server_exit_code"] == 0 and result["http_over_in_process"] > 0
    assert result["http"]["kv_tokens"] == result["kv_tokens"] == 4096  # both engines got the same KV cache
    assert json.loads((tmp_path / "rl_tp1_cpu.json").read_text())["http"]["requests"] == 6


def test_the_process_start_time_is_the_kernels():
    import psutil

    assert process_start_time() == pytest.approx(psutil.Process().create_time(), abs=0.02)


def test_bench_start_reports_phases_in_order(tiny_model, tmp_path):
    result = bench_start(EngineConfig(model=str(tiny_model), device="cpu", kv_cache_tokens=2048), str(tmp_path))
    for run in (result["cold"], result["warm"]):
        names = [p["phase"] for p in run["phases"]]
        assert names[0] == "starting" and names[-1] == "ready" and run["exit_code"] == 0
        assert [PHASES.index(n) for n in names] == sorted(PHASES.index(n) for n in names)
        assert all(p["seconds"] >= 0 for p in run["phases"])
        assert math.isclose(run["total_s"], sum(p["seconds"] for p in run["phases"]), abs_tol=0.01)
        # The server's own ready line says each phase's seconds and the total.
        assert "started in" in run["ready_line"] and all(f"{n} " in run["ready_line"] for n in names)
    assert result["serve_imports_s"] > 0


def test_a_decode_point_times_its_whole_batch_while_later_prompts_prefill(tiny_model):
    """With a small step budget the first prompts decode for many steps before the last is prefilled:
    none may finish before the timed steps end (decode_latency raises if the batch shrank), and the
    mean context it reports is the one measured, past the prompt."""
    from tpfleet.bench.engine import EXTRA_STEPS, decode_latency, prefill_steps, prompt_len_for, why_not_fits
    from tpfleet.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_model), device="cpu", kv_cache_tokens=8192, max_num_seqs=16,
                                    max_num_batched_tokens=16))
    try:
        prompt = prompt_len_for(100, 4)
        assert prefill_steps(engine, 8, prompt) > 4 + EXTRA_STEPS  # more steps than the decodes are timed for
        assert why_not_fits(engine, 8, 100, 4) is None
        row = decode_latency(engine, 8, 100, steps=4, profile=False)
        assert prompt + 2 < row["mean_context"] < prompt + prefill_steps(engine, 8, prompt) + 4
        assert row["tokens_per_s"] > 0
        assert "no room to prefill beside 16 decodes" in why_not_fits(engine, 16, 100, 4)
    finally:
        engine.shutdown()
