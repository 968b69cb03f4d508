"""What NVML says about GPUs: memory in use and the processes holding it. UUID-addressed throughout."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class GPUProcess:
    uuid: str
    pid: int
    name: str
    used_bytes: int


@contextmanager
def _nvml():
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def memory_info(uuids: list[str]) -> dict[str, tuple[int, int]]:
    """uuid -> (bytes used, bytes total)."""
    out = {}
    with _nvml() as nv:
        for u in uuids:
            m = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByUUID(u))
            out[u] = (m.used, m.total)
    return out


def processes_on(uuids: list[str]) -> list[GPUProcess]:
    import psutil

    out = []
    with _nvml() as nv:
        for u in uuids:
            h = nv.nvmlDeviceGetHandleByUUID(u)
            for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                try:
                    name = " ".join(psutil.Process(p.pid).cmdline())[:100]
                except psutil.Error:
                    name = "?"
                out.append(GPUProcess(u, p.pid, name, p.usedGpuMemory or 0))
    return out
