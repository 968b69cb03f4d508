"""What `Fleet` needs of an engine and of a backend, whichever runs the engines.

A backend (local processes, or Ray actors) makes the placement plan, checks and claims the GPUs the
plan names, and hands out one `EngineHandle` per engine start. `Fleet` schedules starts, watches,
restarts and tears down through these two interfaces only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tpfleet.fleet.diagnostics import EngineFailure
    from tpfleet.fleet.placement import EnginePlacement, PlacementPlan

EventSink = Callable[[int, str, dict], None]  # (engine index, event name, details)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class TeardownReport:
    engine: int
    seconds: float
    leftover: list[str] = field(default_factory=list)
    gpu_memory: dict[str, tuple[int, int]] = field(default_factory=dict)  # uuid -> (baseline, after) bytes


class EngineHandle(Protocol):
    """One start of one engine: `start`, then `wait_ready`, then `poll` while serving; `failure` says
    why it is not serving; `stop` ends every process of it."""

    engine: int  # its index in the fleet, kept across restarts
    placement: EnginePlacement
    state: State
    url: str | None  # set once it serves
    ready_s: float | None  # seconds from start to serving

    @property
    def proc_started(self) -> bool:
        """Whether `start` launched something that `stop` must end."""

    def start(self) -> None:
        """Launch the engine; returns at once. Called from the fleet's long-lived spawner thread."""

    def wait_ready(self, timeout_s: float) -> None:
        """Until the engine serves; raises EngineFailure when it fails or misses the deadline."""

    def poll(self) -> State:
        """What is known now, without blocking: READY until the process exits or an exit record appears."""

    def failure(self, reason: str) -> EngineFailure:
        """Everything known about why the engine is not serving; `reason` says what was observed."""

    def stop(self, grace_s: float = 10.0, gpu_baseline: dict[str, int] | None = None) -> TeardownReport:
        """End every process of the engine and check what it leaves behind."""


class FleetBackend(Protocol):
    def plan(self) -> PlacementPlan:
        """Where every rank of every engine runs."""

    def claim_gpus(self, reap: bool, allowed_pids: set[int]) -> dict[str, int]:
        """Refuse (or, with `reap`, kill) stray processes on the planned GPUs; returns each GPU's memory
        in use (bytes, by UUID) as the baseline teardown must return to. Empty for CPU engines."""

    def engine(self, index: int, attempt: int) -> EngineHandle:
        """A handle for start number `attempt` (0: the first, then restarts) of engine `index`."""

    def close(self) -> None:
        """Release what `plan` acquired."""
