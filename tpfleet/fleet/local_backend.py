"""Engines as child processes of this one, on this host's GPUs (or its CPUs)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tpfleet.fleet.engine_process import EngineProcess
from tpfleet.fleet.gpu_state import claim_gpus
from tpfleet.fleet.handle import EventSink
from tpfleet.fleet.placement import PlacementPlan, cpu_plan, plan_placement, select_gpus

if TYPE_CHECKING:
    from tpfleet.fleet.fleet import FleetConfig


class LocalBackend:
    """The local implementation of `FleetBackend` (tpfleet.fleet.handle)."""

    def __init__(self, cfg: FleetConfig, log_dir: Path, on_event: EventSink):
        self.cfg, self.log_dir, self.on_event = cfg, log_dir, on_event
        self._plan: PlacementPlan | None = None

    def plan(self) -> PlacementPlan:
        cfg = self.cfg
        if cfg.device == "cpu":
            self._plan = cpu_plan(cfg.engines, socket.gethostname())
        else:
            from tpfleet.devices import visible_gpus

            gpus = select_gpus(cfg.gpus, visible_gpus())
            self._plan = plan_placement(gpus, cfg.engines, cfg.tp_size, socket.gethostname())
        return self._plan

    def claim_gpus(self, reap: bool, allowed_pids: set[int]) -> dict[str, int]:
        uuids = [gpu_uuid for engine in self._plan.engines for gpu_uuid in engine.uuids]
        return claim_gpus(uuids, reap, allowed_pids) if uuids else {}

    def engine(self, index: int, attempt: int) -> EngineProcess:
        cfg = self.cfg
        placement = self._plan.engines[index]
        host = socket.gethostbyname(socket.gethostname()) if cfg.host == "node" else cfg.host
        return EngineProcess(index, placement, cfg.engine_config(placement.uuids, index), self.log_dir, host,
                             cfg.engine_port, attempt, self.on_event)

    def close(self) -> None:
        pass
