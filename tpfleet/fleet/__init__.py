"""Launch, place, supervise and tear down fleets of TP engines (see fleet.py)."""

from tpfleet.fleet.diagnostics import EngineFailure
from tpfleet.fleet.fleet import Fleet, FleetConfig
from tpfleet.fleet.gpu_state import StaleGPUProcesses

__all__ = ["EngineFailure", "Fleet", "FleetConfig", "StaleGPUProcesses"]
