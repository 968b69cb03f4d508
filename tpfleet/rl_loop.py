"""GRPO against a tpfleet fleet, end to end, small enough for a laptop: what tpfleet is for.

A trainer (transformers, on the same checkpoint) and a fleet of TP engines behind the router. Each
step: push the trainer's weights into every engine under a new `weight_version`, sample a group of
completions per prompt through the router (`return_logprob`), score them with a verifiable toy
reward, normalise rewards within each group (the advantages), recompute the sampled tokens'
log-probs with the trainer, and take one policy-gradient step. Printed per step: the mean reward,
which must rise, and the rollout-vs-trainer log-prob mismatch over every generated token (the
"training-inference mismatch" RL users watch), measured before the step changes the trainer.

The reward is the fraction of completion tokens that start a word (their text begins with a
space): checkable from the token ids alone, and something a randomly initialised model does about
40% of the time, so a group of samples always differs and the gradient has something to follow.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta

import httpx
import torch
import uvicorn

from tpfleet.fleet.fleet import Fleet, FleetConfig
from tpfleet.fleet.router import create_router_app
from tpfleet.server.launch import bind_socket, url_of
from tpfleet.weight_sync import (
    FlattenedBucketSender,
    WeightUpdateGroup,
    broadcast_weights,
    init_weights_update_group,
    trainer_store,
    update_weights_from_distributed_request,
    update_weights_from_tensor_request,
)

PROMPTS = ("Once upon a time", "The river flows", "Hello, world!", "def add(a, b):", "Red, orange, yellow",
           "A graph captures", "The scheduler admits", "In the beginning")
SYNC_METHODS = ("distributed", "tensor", "both")  # both: alternate, distributed first
GROUP_NAME = "rl_loop"
GROUP_TIMEOUT = timedelta(minutes=5)
HTTP_TIMEOUT = 300.0


@dataclass
class RLConfig:
    model: str
    device: str = "cpu"
    engines: int = 2
    tp_size: int = 2
    steps: int = 5
    num_prompts: int = 4
    group_size: int = 8  # G: samples per prompt, each its own /generate request
    max_new_tokens: int = 8
    lr: float = 0.1  # Adam; high because the toy must move within a handful of steps
    seed: int = 0
    weight_sync: str | None = None  # one of SYNC_METHODS; None: what the devices allow, see placement()

    def __post_init__(self) -> None:
        if self.weight_sync not in (None, *SYNC_METHODS):
            raise ValueError(f"weight_sync must be one of {', '.join(SYNC_METHODS)}, not {self.weight_sync!r}")
        if not 1 <= self.num_prompts <= len(PROMPTS):
            raise ValueError(f"num_prompts must be in [1, {len(PROMPTS)}]")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages compare samples within a group")
        if self.steps < 1 or self.max_new_tokens < 1:
            raise ValueError("steps and max_new_tokens must be at least 1")

    @property
    def engine_gpus(self) -> int:
        return self.engines * self.tp_size


@dataclass
class Sample:
    token_ids: list[int]
    engine_logprobs: list[float]
    reward: float


# --- reward and advantages ------------------------------------------------------------------------

def word_start_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """True for every token id whose text begins with a space: the toy reward's targets."""
    return torch.tensor([tokenizer.decode([token]).startswith(" ") for token in range(vocab_size)])


def reward(token_ids: list[int], targets: torch.Tensor) -> float:
    """The fraction of `token_ids` that are targets."""
    return targets[token_ids].float().mean().item() if token_ids else 0.0


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's advantages: each reward relative to its group's (row's) mean, in units of its spread."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + 1e-6)


# --- the trainer's side -----------------------------------------------------------------------------

def completion_logprobs(model, prompt_ids: list[int], completions: list[list[int]]) -> list[torch.Tensor]:
    """log_softmax at temperature 1 of each completion's tokens, from one forward pass over the group
    (right-padded, so no real position sees padding)."""
    device = next(model.parameters()).device
    width = len(prompt_ids) + max(len(c) for c in completions)
    ids = torch.zeros(len(completions), width, dtype=torch.long, device=device)
    for row, completion in enumerate(completions):
        ids[row, :len(prompt_ids) + len(completion)] = torch.tensor(prompt_ids + completion, device=device)
    logits = model(input_ids=ids).logits.float()[:, len(prompt_ids) - 1:-1]
    logprobs = logits.log_softmax(dim=-1).gather(2, ids[:, len(prompt_ids):, None]).squeeze(2)
    return [logprobs[row, :len(completion)] for row, completion in enumerate(completions)]


class WeightPusher:
    """Pushes the trainer's parameters into every engine of a fleet, over one collective group in
    which the trainer is rank 0 and engine i's TP rank r is 1 + i * tp_size + r, or as shared
    tensors (`/update_weights_from_tensor`: shared memory on CPU, CUDA IPC on each rank's GPU)."""

    def __init__(self, fleet: Fleet, device: str, pool: ThreadPoolExecutor, client: httpx.Client):
        self.fleet, self.device, self.pool, self.client = fleet, device, pool, client
        self.handles = fleet.healthy()
        self.group: WeightUpdateGroup | None = None

    def _post_all(self, path: str, bodies: list[dict]) -> list[Future]:
        """POST to every engine at once: collective calls block until every member has joined."""
        return [self.pool.submit(self.client.post, f"{handle.url}{path}", json=body)
                for handle, body in zip(self.handles, bodies)]

    @staticmethod
    def _check(path: str, futures: list[Future]) -> None:
        for future in futures:
            response = future.result()
            if response.status_code != 200 or not response.json().get("success"):
                raise RuntimeError(f"{path} failed ({response.status_code}): {response.text[:1000]}")

    def _alongside(self, path: str, futures: list[Future], trainer_side: Callable[[], object]) -> object:
        """Run the trainer's side of a collective call while the engines run theirs. An engine that
        refuses the call never joins the collective: fail on its answer, not at the group timeout."""
        mine = self.pool.submit(trainer_side)
        pending = list(futures)
        while not mine.done():
            done, _ = wait([mine, *pending], return_when=FIRST_COMPLETED)
            self._check(path, [future for future in done if future is not mine])
            pending = [future for future in pending if future not in done]
        outcome = mine.result()
        self._check(path, pending)
        return outcome

    def join_group(self) -> None:
        tp_size = self.fleet.cfg.tp_size
        world_size = 1 + len(self.handles) * tp_size
        store = trainer_store("127.0.0.1", 0, world_size, GROUP_TIMEOUT)
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        bodies = [{"master_address": "127.0.0.1", "master_port": store.port, "rank_offset": 1 + i * tp_size,
                   "world_size": world_size, "group_name": GROUP_NAME, "backend": backend}
                  for i in range(len(self.handles))]
        path = "/init_weights_update_group"
        self.group = self._alongside(path, self._post_all(path, bodies), lambda: init_weights_update_group(
            "127.0.0.1", store.port, world_size, GROUP_NAME, backend, store=store, timeout=GROUP_TIMEOUT))

    def push_distributed(self, named: list[tuple[str, torch.Tensor]], version: str) -> None:
        if self.group is None:
            self.join_group()
        path = "/update_weights_from_distributed"
        body = update_weights_from_distributed_request(named, GROUP_NAME, version)
        try:
            self._alongside(path, self._post_all(path, [body] * len(self.handles)),
                            lambda: broadcast_weights(self.group, named))
        except Exception:
            self._abandon_group()
            raise

    def _abandon_group(self) -> None:
        """After a failed update: its broadcast, refused by an engine, stays in the group, where the next
        update would take its tensors for its own. The group goes on every side, whatever each answers, and the
        next push joins a new one."""
        group, self.group = self.group, None
        for future in self._post_all("/destroy_weights_update_group", [{"group_name": GROUP_NAME}] * len(self.handles)):
            future.exception()
        group.destroy()

    def push_tensor(self, named: list[tuple[str, torch.Tensor]], version: str) -> None:
        """One payload per TP rank, its buffers on the rank's own GPU (CPU engines share one)."""
        senders: dict[str, FlattenedBucketSender] = {}
        try:
            bodies = []
            for handle in self.handles:
                devices = [self._rank_device(uuid) for uuid in handle.placement.uuids]
                devices = devices or ["cpu"] * self.fleet.cfg.tp_size
                for device in devices:
                    if device not in senders:
                        senders[device] = FlattenedBucketSender(named, device)
                bodies.append(update_weights_from_tensor_request([senders[device].payload() for device in devices],
                                                                 version))
            self._check("/update_weights_from_tensor", self._post_all("/update_weights_from_tensor", bodies))
        finally:
            for sender in senders.values():
                sender.close()

    @staticmethod
    def _rank_device(gpu_uuid: str) -> str:
        from tpfleet.devices import local_index_of

        return f"cuda:{local_index_of(gpu_uuid)}"

    def leave_group(self) -> None:
        """Tear the group down on every side; only between updates (a member stuck in one would hang)."""
        if self.group is not None:
            self._check("/destroy_weights_update_group", self._post_all(
                "/destroy_weights_update_group", [{"group_name": GROUP_NAME}] * len(self.handles)))
            self.group.destroy()
            self.group = None


# --- the router, in this process ------------------------------------------------------------------

class RouterThread:
    """The fleet's router served by uvicorn on 127.0.0.1 (a port the kernel picks), in a thread."""

    def __init__(self, fleet: Fleet):
        sock = bind_socket("127.0.0.1", 0)
        self.url = url_of(sock)
        self.server = uvicorn.Server(uvicorn.Config(create_router_app(fleet), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="tpfleet-router")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the router did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# --- the loop -----------------------------------------------------------------------------------------

def rollout(client: httpx.Client, pool: ThreadPoolExecutor, router_url: str, prompts: list[list[int]],
            cfg: RLConfig, seeds: torch.Tensor, version: str, targets: torch.Tensor) -> list[Sample]:
    """G sampled completions of every prompt through the router, each a /generate request of its own."""
    def one(prompt: int, sample: int) -> Sample:
        body = {"input_ids": prompts[prompt], "return_logprob": True,
                "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "ignore_eos": True,
                                    "max_new_tokens": cfg.max_new_tokens,
                                    "sampling_seed": int(seeds[prompt, sample])}}
        response = client.post(f"{router_url}/generate", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/generate failed ({response.status_code}): {response.text[:500]}")
        meta = response.json()["meta_info"]
        if meta["weight_version"] != version:
            raise RuntimeError(f"a rollout came from weight_version {meta['weight_version']!r}, "
                               f"not {version!r}, the version pushed before it")
        entries = meta["output_token_logprobs"]
        token_ids = [token for _, token, _ in entries]
        return Sample(token_ids, [logprob for logprob, _, _ in entries], reward(token_ids, targets))

    futures = [pool.submit(one, prompt, sample) for prompt in range(len(prompts)) for sample in range(cfg.group_size)]
    return [future.result() for future in futures]


def policy_gradient_step(trainer, optimizer: torch.optim.Optimizer, prompts: list[list[int]], samples: list[Sample],
                         advantages: torch.Tensor) -> torch.Tensor:
    """One step on loss = -advantage * (sum of the sampled tokens' log-probs), averaged over samples.
    Returns |trainer - engine| log-prob of every generated token, from the weights before the step."""
    trainer.train()
    group_size = advantages.shape[1]
    device = advantages.device
    loss, differences = torch.zeros((), device=device), []
    for prompt, prompt_ids in enumerate(prompts):
        group = samples[prompt * group_size:(prompt + 1) * group_size]
        logprobs = completion_logprobs(trainer, prompt_ids, [sample.token_ids for sample in group])
        for sample, mine in zip(group, logprobs):
            differences.append((mine.detach() - torch.tensor(sample.engine_logprobs, device=device)).abs())
        sums = torch.stack([mine.sum() for mine in logprobs])
        loss = loss - (advantages[prompt] * sums).sum() / len(samples)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return torch.cat(differences)


def sync_method(weight_sync: str, step: int) -> str:
    if weight_sync == "both":
        return "distributed" if step % 2 == 0 else "tensor"
    return weight_sync


def placement(cfg: RLConfig) -> tuple[FleetConfig, str, str]:
    """The fleet, the trainer's device and the weight-sync method. On GPUs the engines take the first
    engines * tp_size GPUs and the trainer the next one if there is one: NCCL allows one rank of a
    group per GPU. Without a spare GPU the trainer shares the first engine's and only sends shared
    tensors (CUDA IPC), as a colocated trainer does."""
    engine: dict = {"dtype": "float32"}
    gpus, trainer_device, method = None, "cpu", cfg.weight_sync or "distributed"
    if cfg.device == "cuda":
        available = torch.cuda.device_count()
        if available < cfg.engine_gpus:
            raise RuntimeError(f"{cfg.engines} engines of TP {cfg.tp_size} need {cfg.engine_gpus} GPUs; "
                               f"{available} are visible")
        gpus = [str(index) for index in range(cfg.engine_gpus)]
        if available > cfg.engine_gpus:
            trainer_device, method = f"cuda:{cfg.engine_gpus}", cfg.weight_sync or "both"
        elif cfg.weight_sync in (None, "tensor"):
            trainer_device, method = "cuda:0", "tensor"
        else:
            raise RuntimeError(f"weight_sync {cfg.weight_sync!r} needs a GPU for the trainer beside the engines' "
                               f"{cfg.engine_gpus}; {available} are visible (use 'tensor')")
        engine["mem_fraction_static"] = 0.5  # room for the trainer and the shared weight buffers
    else:
        engine["kv_cache_tokens"] = 4096
    fleet = FleetConfig(model=cfg.model, engines=cfg.engines, tp_size=cfg.tp_size, device=cfg.device, engine=engine,
                        gpus=gpus, max_concurrent_starts=cfg.engines, colocated_pids=[os.getpid()])
    return fleet, trainer_device, method


def train(cfg: RLConfig, log: Callable[[str], None] = print) -> dict:
    """Run the loop. Returns per step: "rewards", "mismatch_mean", "mismatch_max", "weight_versions",
    "weight_sync", "step_seconds"; and "processes_left", the engines' processes still alive after
    the fleet stopped (none, when all is well)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    fleet_cfg, device, weight_sync = placement(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    trainer = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device)
    optimizer = torch.optim.Adam(trainer.parameters(), lr=cfg.lr)
    targets = word_start_mask(tokenizer, trainer.config.vocab_size)
    prompts = [tokenizer(text).input_ids for text in PROMPTS[:cfg.num_prompts]]
    seeds = torch.randint(0, 2**62, (cfg.steps, cfg.num_prompts, cfg.group_size),
                          generator=torch.Generator().manual_seed(cfg.seed))
    result: dict = {key: [] for key in ("rewards", "mismatch_mean", "mismatch_max", "weight_versions",
                                        "weight_sync", "step_seconds")}

    started = time.perf_counter()
    fleet = Fleet(fleet_cfg)
    # The fleet stops before the pool and the client close: HTTP calls still waiting on it end at once.
    with ThreadPoolExecutor(max_workers=64, thread_name_prefix="rl-http") as pool, \
            httpx.Client(timeout=HTTP_TIMEOUT) as client:
        fleet.start()
        try:
            router = RouterThread(fleet)
            try:
                log(f"{cfg.engines} engines of TP {cfg.tp_size} on {cfg.device} behind the router at {router.url} "
                    f"({time.perf_counter() - started:.1f}s); G={cfg.group_size} samples of {cfg.max_new_tokens} "
                    f"tokens for each of {cfg.num_prompts} prompts per step; "
                    f"reward: the fraction of tokens that start a word")
                pusher = WeightPusher(fleet, device, pool, client)
                for step in range(cfg.steps):
                    started = time.perf_counter()
                    version, method = str(step), sync_method(weight_sync, step)
                    named = [(name, param.detach()) for name, param in trainer.named_parameters()]
                    (pusher.push_distributed if method == "distributed" else pusher.push_tensor)(named, version)
                    samples = rollout(client, pool, router.url, prompts, cfg, seeds[step], version, targets)
                    rewards = torch.tensor([s.reward for s in samples]).view(cfg.num_prompts, cfg.group_size)
                    differences = policy_gradient_step(trainer, optimizer, prompts, samples,
                                                       group_advantages(rewards).to(device))
                    for key, value in (("rewards", rewards.mean().item()),
                                       ("mismatch_mean", differences.mean().item()),
                                       ("mismatch_max", differences.max().item()), ("weight_versions", version),
                                       ("weight_sync", method), ("step_seconds", time.perf_counter() - started)):
                        result[key].append(value)
                    log(f"step {step}: mean reward {result['rewards'][-1]:.3f}; rollout-vs-trainer logprob "
                        f"mismatch mean {result['mismatch_mean'][-1]:.1e}, max {result['mismatch_max'][-1]:.1e} "
                        f"over {differences.numel()} tokens; weights v{version} via "
                        f"update_weights_from_{method} ({result['step_seconds'][-1]:.1f}s)")
                pusher.leave_group()
            finally:
                router.stop()
        finally:
            teardown = fleet.stop()
    result["processes_left"] = [process for report in teardown for process in report.leftover]
    return result
