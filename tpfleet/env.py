"""Every environment variable tpfleet reads or sets, declared once, typed, with its default.

Switches are read when asked for, not at import, so a test or a launcher can change them between
calls; nothing here writes `os.environ` unless a caller asks (`apply_multicast_off`).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Switch:
    name: str
    default: bool
    help: str

    def __call__(self) -> bool:
        value = os.environ.get(self.name)
        return self.default if value is None else value != "0"


PDL = Switch("TPFLEET_PDL", True, "programmatic dependent launch for batch-1 decode kernels on Hopper (0: off)")
FUSED_AR = Switch("TPFLEET_FUSED_AR", True, "all-reduces fused into batch-1 decode projections at TP > 1 (0: off)")

CACHE_DIR = "TPFLEET_CACHE_DIR"  # JIT builds, tuning tables, warm-up markers; default $XDG_CACHE_HOME/tpfleet
ENGINE_ID = "TPFLEET_ENGINE_ID"  # inherited by every process of one fleet engine, to find them all at teardown
EXIT_RECORD = "TPFLEET_EXIT_RECORD"  # where an engine writes its exit record (tpfleet.exits); set by its parent
API_KEY = "TPFLEET_API_KEY"  # default of --api-key: engines a fleet starts inherit it (keys stay out of argv)
ADMIN_API_KEY = "TPFLEET_ADMIN_API_KEY"  # default of --admin-api-key, likewise
NCCL_GRAPH_REGISTER = "NCCL_GRAPH_REGISTER"  # "0" on engine ranks while the memory saver is on: its memory
# cannot be registered with NCCL, and graphs must not try
TRITON_CACHE_DIR = "TRITON_CACHE_DIR"
TRITON_INTERPRET = "TRITON_INTERPRET"

# NVLink multicast must stay off on shared multi-GPU hosts: a program that uses it can take every GPU
# of the host out of service. Every process tpfleet starts gets these, also one with its own environment.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def apply_multicast_off(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set the multicast-off variables in `environ` (default: this process's) where they are unset."""
    environ = os.environ if environ is None else environ
    for key, value in MULTICAST_OFF.items():
        environ.setdefault(key, value)
    return environ


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process tpfleet starts: this one's, multicast off, no model hub, unbuffered output."""
    env = {**HUB_OFFLINE, **os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def cache_root() -> Path:
    if os.environ.get(CACHE_DIR):
        return Path(os.environ[CACHE_DIR])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tpfleet"


def triton_interpreted() -> bool:
    return os.environ.get(TRITON_INTERPRET) == "1"


def exit_record_path() -> str | None:
    return os.environ.get(EXIT_RECORD) or None


# tpfleet loads checkpoints from local directories only: a model name that is not one must fail at once,
# not after minutes of retried hub look-ups. Set where unset (a user's explicit value wins).
HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def apply_hub_offline(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set the hub-offline variables in `environ` (default: this process's) where they are unset."""
    environ = os.environ if environ is None else environ
    for key, value in HUB_OFFLINE.items():
        environ.setdefault(key, value)
    return environ
