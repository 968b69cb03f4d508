"""The RL loop of examples/rl_loop.py (tpfleet.rl_loop): a trainer and a fleet behind the router,
GRPO steps with weights pushed before every rollout. On CPU in float32 the engines' log-probs must
match the trainer's to 1e-4 and the toy reward must rise."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tpfleet.rl_loop import RLConfig, WeightPusher, group_advantages, reward, rollout

EXAMPLE = Path(__file__).parent.parent / "examples" / "rl_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("rl_loop_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.6]])
    advantages = group_advantages(rewards)
    torch.testing.assert_close(advantages.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages.std(dim=1), torch.ones(2), atol=1e-4, rtol=0)
    assert advantages[0, 1] > advantages[0, 2] > advantages[0, 0]
    # a group whose samples all score the same teaches nothing
    assert group_advantages(torch.full((1, 4), 0.3)).abs().max() == 0


def test_reward_is_the_fraction_of_target_tokens():
    targets = torch.tensor([False, True, False, True])
    assert reward([1, 3, 0, 2], targets) == 0.5
    assert reward([1, 1], targets) == 1.0
    assert reward([], targets) == 0.0


def test_rollout_refuses_a_sample_from_other_weights():
    def engine(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["return_logprob"] is True and body["sampling_params"]["temperature"] == 1.0
        return httpx.Response(200, json={"text": "", "output_ids": [5], "meta_info": {
            "weight_version": "0", "output_token_logprobs": [[-0.5, 5, None]]}})

    cfg = RLConfig(model="unused", num_prompts=1, group_size=2, max_new_tokens=1)
    seeds = torch.zeros(1, 2, dtype=torch.long)
    with httpx.Client(transport=httpx.MockTransport(engine)) as client, ThreadPoolExecutor(2) as pool:
        samples = rollout(client, pool, "http://router", [[1, 2]], cfg, seeds, "0", torch.ones(6, dtype=torch.bool))
        assert [(s.token_ids, s.engine_logprobs, s.reward) for s in samples] == [([5], [-0.5], 1.0)] * 2
        with pytest.raises(RuntimeError, match="weight_version '0', not '1'"):
            rollout(client, pool, "http://router", [[1, 2]], cfg, seeds, "1", torch.ones(6, dtype=torch.bool))


def test_an_engine_refusing_a_collective_fails_the_trainer_at_once():
    """The trainer's broadcast would wait for the refusing engine until the group timeout."""
    class NoEngines:
        def healthy(self):
            return []

    release = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        pusher = WeightPusher(NoEngines(), "cpu", pool, client=None)
        refusal = pool.submit(lambda: httpx.Response(400, json={"success": False, "message": "names[0]: unknown"}))
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="names\\[0\\]: unknown"):
            pusher._alongside("/update_weights_from_distributed", [refusal], lambda: release.wait(60))
        assert time.monotonic() - started < 10
        release.set()


def test_a_refused_push_leaves_nothing_for_the_next_to_take(tiny_model):
    """The refused update's broadcast stays in its group: the pusher drops the group on every side, so the next
    push, over a new one, loads its own tensors, not the refused update's zeros."""
    from transformers import AutoModelForCausalLM

    from tpfleet.fleet import Fleet, FleetConfig

    trainer = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    named = [(name, param.detach()) for name, param in trainer.named_parameters()]
    zeros = [(name, torch.zeros_like(tensor)) for name, tensor in named] + [("v_head.weight", torch.zeros(2, 2))]
    fleet = Fleet(FleetConfig(model=str(tiny_model), engines=1, tp_size=1, device="cpu",
                              engine={"kv_cache_tokens": 2048, "dtype": "float32"}))
    with ThreadPoolExecutor(8) as pool, httpx.Client(timeout=120) as client:
        fleet.start()
        try:
            pusher = WeightPusher(fleet, "cpu", pool, client)
            with pytest.raises(RuntimeError, match="v_head"):
                pusher.push_distributed(zeros, "refused")
            assert pusher.group is None
            pusher.push_distributed(named, "real")
            answer = client.post(f"{fleet.healthy()[0].url}/generate", json={
                "input_ids": [5, 6, 7], "return_logprob": True,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0}}).json()
            pusher.leave_group()
        finally:
            fleet.stop()
    [[logprob, token, _]] = answer["meta_info"]["output_token_logprobs"]
    with torch.no_grad():
        expected = trainer(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1].log_softmax(-1)[token].item()
    assert answer["meta_info"]["weight_version"] == "real" and logprob == pytest.approx(expected, abs=1e-4)


def test_rl_loop_raises_the_reward_with_matching_logprobs(tiny_model):
    """Two engines of TP 2 on CPU, both weight-sync routes alternating: gloo broadcast on even steps,
    shared memory on odd ones. The rewards are measured on the engines' rollouts, so they rise only if
    the pushes arrive; the mismatch bound says they arrived whole."""
    result = load_example().main(["--model", str(tiny_model), "--engines", "2", "--tp-size", "2", "--steps", "5",
                                  "--num-prompts", "4", "--group-size", "8", "--max-new-tokens", "8",
                                  "--weight-sync", "both", "--seed", "0"])
    assert result["weight_versions"] == ["0", "1", "2", "3", "4"]
    assert result["weight_sync"] == ["distributed", "tensor", "distributed", "tensor", "distributed"]
    assert max(result["mismatch_max"]) < 1e-4, result["mismatch_max"]
    rewards = result["rewards"]
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.1, rewards
    assert result["processes_left"] == []


@pytest.mark.gpu
def test_rl_loop_on_gpus(tiny_model):
    """As many engines as the GPUs allow; with a GPU to spare the trainer takes it and alternates NCCL
    broadcasts with CUDA IPC, else it shares the first engine's GPU and sends CUDA IPC handles only."""
    gpus = torch.cuda.device_count()
    engines, tp_size = (2, 2) if gpus >= 5 else (2, 1) if gpus >= 3 else (1, 1)
    # Eight steps: with one engine's 32 samples a step, the reward can take five steps to leave its start
    # (on the CPU too: 0.42, 0.40, 0.35, 0.47, then 0.94 with one engine and seed 0).
    steps = 8
    result = load_example().main(["--model", str(tiny_model), "--device", "cuda", "--engines", str(engines),
                                  "--tp-size", str(tp_size), "--steps", str(steps), "--seed", "0"])
    spare = gpus > engines * tp_size
    assert result["weight_sync"] == ((["distributed", "tensor"] * steps)[:steps] if spare else ["tensor"] * steps)
    assert result["weight_versions"] == [str(step) for step in range(steps)]
    assert max(result["mismatch_max"]) < 1e-2, result["mismatch_max"]
    assert sum(result["rewards"][-2:]) / 2 > result["rewards"][0] + 0.1, result["rewards"]
    assert result["processes_left"] == []
