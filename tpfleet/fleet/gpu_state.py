"""What NVML says about GPUs: memory in use and the processes holding it. UUID-addressed throughout."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


class StaleGPUProcesses(RuntimeError):
    pass


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


def claim_gpus(uuids: list[str], reap: bool, allowed_pids: set[int]) -> dict[str, int]:
    """Make sure no stray process holds these GPUs (refuse, or kill them when `reap`), then return
    their memory in use as the baseline teardown must return to. Runs on the GPUs' own host."""
    import os
    import time

    import psutil

    allowed = allowed_pids | {os.getpid()}  # ourselves, and colocated trainers, are meant to be there
    stale = [p for p in processes_on(uuids) if p.pid not in allowed]
    if stale and not reap:
        listing = "; ".join(f"pid {p.pid} on {p.uuid} holds {p.used_bytes / 2**30:.1f} GiB ({p.name})" for p in stale)
        raise StaleGPUProcesses(f"GPUs are in use by other processes: {listing}. Stop them, or pass "
                                f"--reap-stale to kill them first")
    procs = []
    for p in stale:
        try:
            procs.append(psutil.Process(p.pid))
            procs[-1].terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
    if stale:
        time.sleep(1)  # let the driver release their memory before taking the baseline
    return {u: used for u, (used, _) in memory_info(uuids).items()}
