"""Engines inside Ray actors: one placement group per engine (its GPUs on one node), or the bundles of a
placement group the caller owns (a trainer's), one actor per engine rank on the bundle named for it.

The plan is built from what each actor measures, not from what the driver assumes: its host, its
node IP, and the physical GPU ids Ray granted it (`ray.get_gpu_ids()`), turned into UUIDs by NVML on
that node. The engine process is then started by the actor with CUDA_VISIBLE_DEVICES set to those
UUIDs. That holds both when Ray masks CUDA_VISIBLE_DEVICES per actor and under
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, where every actor sees all GPUs and `cuda:0` would
be the same device for all of them.

In a caller's placement group, each rank's actor asks its bundle for a share of one GPU (e.g. 0.2 beside
a trainer actor's 0.8), so Ray grants it the GPU that bundle holds; rank 0's actor runs the engine on
all its ranks' GPUs, and the others hold their bundles' reservations for as long as the engine lives.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tpfleet.config import EngineConfig
from tpfleet.devices import DeviceError
from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.engine_process import EngineProcess
from tpfleet.fleet.handle import EventSink, State, TeardownReport
from tpfleet.fleet.placement import BundleFacts, EnginePlacement, PlacementPlan, merge_rank_facts, plan_from_bundles

if TYPE_CHECKING:
    from tpfleet.fleet.fleet import FleetConfig


class EngineActor:
    """Runs in a Ray worker process; wraps an EngineProcess so the diagnostics are the same."""

    def __init__(self):
        self.proc: EngineProcess | None = None
        self.events: list[tuple[int, str, dict]] = []

    def describe(self) -> BundleFacts:
        import ray

        ids = tuple(str(i) for i in ray.get_gpu_ids())
        return BundleFacts(socket.gethostname(), ray.util.get_node_ip_address(), ids, tuple(_uuids_of(list(ids))),
                           os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_runtime_context().get_node_id())

    def claim_gpus(self, uuids: list[str], reap: bool, allowed_pids: set[int],
                   shared: bool = False) -> tuple[dict[str, int], str | None]:
        """The stale-process check and memory baseline, on this actor's node (NVML is per host). `shared`:
        the GPUs are a caller's, shared on purpose (a trainer's bundles): whatever runs there may stay."""
        from tpfleet.fleet.gpu_state import StaleGPUProcesses, claim_gpus, processes_on

        if shared:
            allowed_pids = allowed_pids | {p.pid for p in processes_on(uuids)}
        try:
            return claim_gpus(uuids, reap, allowed_pids), None
        except StaleGPUProcesses as error:
            return {}, f"{socket.gethostname()}: {error}"

    def start(self, engine: int, placement: EnginePlacement, config: EngineConfig, log_dir: str, host: str,
              port: int, attempt: int) -> int:
        self.proc = EngineProcess(engine, placement, config, Path(log_dir), host, port, attempt,
                                  lambda index, event, info: self.events.append((index, event, info)))
        self.proc.start()
        return self.proc.proc.pid

    def wait_ready(self, timeout_s: float) -> tuple[EngineFailure | None, str | None, float | None]:
        try:
            self.proc.wait_ready(timeout_s)
            return None, self.proc.url, self.proc.ready_s
        except EngineFailure as failure:
            return failure, None, None

    def poll(self) -> str:
        return self.proc.poll().value

    def failure(self, reason: str) -> EngineFailure:
        return self.proc.failure(reason)

    def stop(self, grace_s: float, gpu_baseline: dict[str, int]) -> TeardownReport:
        return self.proc.stop(grace_s, gpu_baseline)

    def drain_events(self) -> list:
        out, self.events = self.events, []
        return out


def _uuids_of(ids: list[str]) -> list[str]:
    """Ray's GPU ids are physical (NVML) indices or UUIDs; logical GPUs on a CPU node have no UUID."""
    try:
        from tpfleet.devices import physical_gpus

        by_index = {str(g.index): g.uuid for g in physical_gpus()}
    except Exception:  # noqa: BLE001 - no NVML: logical GPUs declared on a CPU machine
        return [f"logical-{i}" for i in ids]
    return [i if i.startswith("GPU-") else by_index[i] for i in ids]


class RayEngine:
    """The driver's handle on one engine actor: the Ray implementation of `EngineHandle`."""

    def __init__(self, engine: int, attempt: int, actor, placement: EnginePlacement, config: EngineConfig,
                 log_dir: Path, host: str, port: int, on_event: EventSink):
        self.engine, self.attempt, self.actor, self.placement, self.config = engine, attempt, actor, placement, config
        self.log_dir, self.host, self.port, self.on_event = log_dir, host, port, on_event
        self.url: str | None = None
        self.ready_s: float | None = None
        self.state = State.STARTING
        self.proc_started = False

    def start(self) -> None:
        import ray

        ray.get(self.actor.start.remote(self.engine, self.placement, self.config, str(self.log_dir), self.host,
                                        self.port, self.attempt))
        self.proc_started = True
        self.on_event(self.engine, "spawned", {"actor": True})

    def wait_ready(self, timeout_s: float) -> None:
        import ray

        failure, url, ready_s = ray.get(self.actor.wait_ready.remote(timeout_s))
        for engine, event, info in ray.get(self.actor.drain_events.remote()):
            if event != "spawned":
                self.on_event(engine, event, info)
        if failure is not None:
            self.state = State.FAILED
            raise failure
        self.url, self.ready_s, self.state = url, ready_s, State.READY

    def poll(self) -> State:
        import ray

        if self.state is State.READY:
            self.state = State(ray.get(self.actor.poll.remote()))
        return self.state

    def failure(self, reason: str) -> EngineFailure:
        import ray

        return ray.get(self.actor.failure.remote(reason))

    def stop(self, grace_s: float = 10.0, gpu_baseline: dict[str, int] | None = None) -> TeardownReport:
        import ray

        report = ray.get(self.actor.stop.remote(grace_s, gpu_baseline or {}))
        self.state = State.STOPPED
        return report


class RayBackend:
    """The Ray implementation of `FleetBackend`: one placement group of one bundle per engine, one
    actor in each, and the plan built from what the actors measure in their bundles."""

    def __init__(self, cfg: FleetConfig, log_dir: Path, on_event: EventSink):
        self.cfg, self.log_dir, self.on_event = cfg, log_dir, on_event
        self.groups: list = []  # the placement groups this backend made (never the caller's)
        self.actors: list = []  # per engine: the actor that runs it (its rank 0's)
        self.rank_actors: list = []  # every actor, one per rank in a caller's placement group
        self.facts: list[BundleFacts] = []  # per engine, its ranks' facts merged in rank order
        self.rank_facts: list[BundleFacts] = []
        self._plan: PlacementPlan | None = None
        self._owns_ray = False

    @property
    def _with_gpus(self) -> bool:
        return self.cfg.device == "cuda"

    def plan(self) -> PlacementPlan:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False)
            self._owns_ray = True
        if cfg.placement_group is not None:
            return self._plan_in_callers_group()
        gpus = cfg.tp_size if (self._with_gpus or cfg.ray_logical_gpus) else 0
        bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
        self.groups = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(cfg.engines)]
        ray.get([group.ready() for group in self.groups], timeout=cfg.startup_timeout_s)
        actor_cls = ray.remote(EngineActor)
        self.actors = [
            actor_cls.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=0)).remote()
            for group in self.groups]
        self.facts = ray.get([actor.describe.remote() for actor in self.actors])
        self._plan = plan_from_bundles(self.facts, cfg.tp_size, self._with_gpus, use_node_ip=cfg.host == "node")
        return self._plan

    def _plan_in_callers_group(self) -> PlacementPlan:
        """Rank r of engine e on bundle `bundle_indices[e * tp_size + r]` of the caller's group."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        group = resolve_placement_group(cfg.placement_group)
        ray.get(group.ready(), timeout=cfg.startup_timeout_s)
        if max(cfg.bundle_indices) >= group.bundle_count:
            raise DeviceError(f"bundle_indices {cfg.bundle_indices} name bundles the placement group does not have "
                              f"(it has {group.bundle_count})")
        gpus = cfg.num_gpus_per_actor if (self._with_gpus or cfg.ray_logical_gpus) else 0
        actor_cls = ray.remote(EngineActor)
        self.rank_actors = [
            actor_cls.options(num_cpus=0, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=False)).remote()
            for bundle in cfg.bundle_indices]
        self.rank_facts = ray.get([actor.describe.remote() for actor in self.rank_actors],
                                  timeout=cfg.startup_timeout_s)
        tp = cfg.tp_size
        self.actors = self.rank_actors[::tp]
        self.facts = [merge_rank_facts(engine, self.rank_facts[engine * tp:(engine + 1) * tp], self._with_gpus)
                      for engine in range(cfg.engines)]
        self._plan = plan_from_bundles(self.facts, tp, self._with_gpus, use_node_ip=cfg.host == "node")
        return self._plan

    def claim_gpus(self, reap: bool, allowed_pids: set[int]) -> dict[str, int]:
        import ray

        from tpfleet.fleet.gpu_state import StaleGPUProcesses

        if not any(engine.ranks for engine in self._plan.engines):
            return {}
        shared = self.cfg.placement_group is not None
        answers = ray.get([actor.claim_gpus.remote(engine.uuids, reap, allowed_pids, shared)
                           for actor, engine in zip(self.actors, self._plan.engines)])
        errors = [error for _, error in answers if error]
        if errors:
            raise StaleGPUProcesses("; ".join(errors))
        return {gpu_uuid: used for baseline, _ in answers for gpu_uuid, used in baseline.items()}

    def engine(self, index: int, attempt: int) -> RayEngine:
        placement = self._plan.engines[index]
        host = placement.host if self.cfg.host == "node" else self.cfg.host
        return RayEngine(index, attempt, self.actors[index], placement, self.cfg.engine_config(placement.uuids, index),
                         self.log_dir, host, self.cfg.engine_port, self.on_event)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.rank_actors or self.actors:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
        self.actors, self.rank_actors, self.groups = [], [], []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def resolve_placement_group(value):
    """A PlacementGroup as given, or the one with this name, or with this id (hex)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    if isinstance(value, PlacementGroup):
        return value
    if not isinstance(value, str):
        raise ValueError(f"placement_group must be a ray PlacementGroup, its name or its id, not {value!r}")
    try:
        return ray.util.get_placement_group(value)  # by name, in this job's namespace
    except ValueError:
        pass
    for group_id, info in ray.util.placement_group_table().items():  # by id, or by name in any namespace
        if value in (group_id, info.get("name")) and info.get("state") != "REMOVED":
            return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
    raise ValueError(f"placement_group: no placement group is named {value!r} or has that id")
