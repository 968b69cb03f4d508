"""Launch, place, supervise and tear down fleets of TP engines (see fleet.py)."""

from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.fleet import Fleet, FleetConfig, StaleGPUProcesses

__all__ = ["EngineFailure", "Fleet", "FleetConfig", "StaleGPUProcesses"]
