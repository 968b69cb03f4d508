"""Engines inside Ray actors, one placement group per engine (its GPUs on one node).

The plan is built from what each actor measures, not from what the driver assumes: its host, its
node IP, and the physical GPU ids Ray granted it (`ray.get_gpu_ids()`), turned into UUIDs by NVML on
that node. The engine process is then started by the actor with CUDA_VISIBLE_DEVICES set to those
UUIDs. That holds both when Ray masks CUDA_VISIBLE_DEVICES per actor and under
RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, where every actor sees all GPUs and `cuda:0` would
be the same device for all of them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.engine_process import EngineProcess, State, TeardownReport
from tpfleet.fleet.placement import EnginePlacement, PlacementPlan, RankPlacement


class EngineActor:
    """Runs in a Ray worker process; wraps an EngineProcess so the diagnostics are the same."""

    def __init__(self):
        self.proc: EngineProcess | None = None
        self.events: list[tuple[int, str, dict]] = []

    def describe(self) -> dict:
        import ray

        ids = [str(i) for i in ray.get_gpu_ids()]
        return {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "gpu_ids": ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "uuids": _uuids_of(ids)}

    def claim_gpus(self, uuids: list[str], reap: bool, allowed_pids: set[int]) -> tuple[dict[str, int], str | None]:
        """The stale-process check and memory baseline, on this actor's node (NVML is per host)."""
        from tpfleet.fleet.gpu_state import StaleGPUProcesses, claim_gpus

        try:
            return claim_gpus(uuids, reap, allowed_pids), None
        except StaleGPUProcesses as e:
            return {}, f"{socket.gethostname()}: {e}"

    def start(self, engine: int, placement: EnginePlacement, serve_args: list[str], log_dir: str, host: str) -> int:
        self.proc = EngineProcess(engine, placement, serve_args, Path(log_dir), host,
                                  lambda e, ev, info: self.events.append((e, ev, info)))
        self.proc.start()
        return self.proc.proc.pid

    def wait_ready(self, timeout_s: float) -> tuple[EngineFailure | None, str | None, float | None]:
        try:
            self.proc.wait_ready(timeout_s)
            return None, self.proc.url, self.proc.ready_s
        except EngineFailure as f:
            return f, None, None

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
    """The driver's handle on one engine actor: the same surface as EngineProcess."""

    def __init__(self, engine: int, actor, placement: EnginePlacement, cfg, log_dir: Path, on_event):
        self.engine, self.actor, self.placement = engine, actor, placement
        self.cfg, self.log_dir, self.on_event = cfg, log_dir, on_event
        self.url: str | None = None
        self.ready_s: float | None = None
        self.state = State.STARTING
        self.proc_started = False

    def start(self) -> None:
        import ray

        host = self.placement.host if self.cfg.host == "node" else self.cfg.host
        ray.get(self.actor.start.remote(self.engine, self.placement, self.cfg.serve_args(), str(self.log_dir), host))
        self.proc_started = True
        self.on_event(self.engine, "spawned", {"actor": True})

    def wait_ready(self, timeout_s: float) -> None:
        import ray

        failure, url, ready_s = ray.get(self.actor.wait_ready.remote(timeout_s))
        for e, ev, info in ray.get(self.actor.drain_events.remote()):
            if ev != "spawned":
                self.on_event(e, ev, info)
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


class RayEngines:
    def __init__(self, cfg, log_dir: Path, on_event):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=cfg.ray_address, log_to_driver=False, include_dashboard=False)
        self.cfg, self.log_dir, self.on_event = cfg, log_dir, on_event
        gpus = cfg.tp if (cfg.device == "cuda" or cfg.ray_logical_gpus) else 0
        bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
        self.groups = [placement_group([bundle], strategy="STRICT_PACK") for _ in range(cfg.engines)]
        ray.get([g.ready() for g in self.groups], timeout=cfg.startup_timeout_s)
        actor_cls = ray.remote(EngineActor)
        self.actors = [
            actor_cls.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=g, placement_group_bundle_index=0)).remote()
            for g in self.groups]
        facts = ray.get([a.describe.remote() for a in self.actors])
        engines = []
        for e, f in enumerate(facts):
            host = f["ip"] if cfg.host == "node" else f["host"]
            ranks = () if cfg.device == "cpu" else tuple(
                RankPlacement(e, r, u, int(i) if i.isdigit() else -1, r, host)
                for r, (i, u) in enumerate(zip(f["gpu_ids"], f["uuids"])))
            engines.append(EnginePlacement(e, host, ranks))
        self.facts = facts
        self.plan = PlacementPlan(tuple(engines))

    def claim_gpus(self, reap: bool, allowed_pids: set[int]) -> dict[str, int]:
        import ray

        from tpfleet.fleet.gpu_state import StaleGPUProcesses

        if self.cfg.device == "cpu":
            return {}
        answers = ray.get([a.claim_gpus.remote(e.uuids, reap, allowed_pids)
                           for a, e in zip(self.actors, self.plan.engines)])
        errors = [err for _, err in answers if err]
        if errors:
            raise StaleGPUProcesses("; ".join(errors))
        return {u: used for baseline, _ in answers for u, used in baseline.items()}

    def engine(self, e: int) -> RayEngine:
        return RayEngine(e, self.actors[e], self.plan.engines[e], self.cfg, self.log_dir, self.on_event)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        for g in self.groups:
            remove_placement_group(g)
        if self._owns_ray:
            ray.shutdown()
