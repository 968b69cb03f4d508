"""Launch, place, supervise and tear down fleets of TP engines (see fleet.py).

The names below load on first use, so that importing one light module of this package (placement,
diagnostics) does not import the others and the HTTP client behind `Fleet`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"EngineFailure": "diagnostics", "EngineHandle": "handle", "Fleet": "fleet", "FleetBackend": "handle",
            "FleetConfig": "fleet", "StaleGPUProcesses": "gpu_state"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
