"""GPU identity: physical UUIDs, and how CUDA_VISIBLE_DEVICES maps them to a process's local indices.

Indices mean different things in different processes (Ray and launchers remap CUDA_VISIBLE_DEVICES),
so tpfleet names a GPU by its UUID everywhere and converts to a local index only at the last moment.
The parsing follows the CUDA driver: entries are indices or (prefixes of) UUIDs, separated by commas,
and the list ends at the first entry that names no device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class PhysicalGPU:
    index: int  # the driver's (NVML's) index, as nvidia-smi shows it
    uuid: str  # "GPU-xxxxxxxx-..."
    name: str = ""
    arch: str = ""  # compute capability as in sm_90: "90"


class DeviceError(RuntimeError):
    pass


def parse_visible_devices(value: str | None, gpus: list[PhysicalGPU]) -> list[PhysicalGPU]:
    """The GPUs a process sees, in its local index order, for a given CUDA_VISIBLE_DEVICES."""
    if value is None:
        return list(gpus)
    seen: list[PhysicalGPU] = []
    for raw in value.split(","):
        entry = raw.strip()
        gpu = _lookup(entry, gpus)
        if gpu is None:
            break  # the driver ignores this entry and everything after it
        if gpu in seen:
            raise DeviceError(f"CUDA_VISIBLE_DEVICES={value!r} names {gpu.uuid} twice")
        seen.append(gpu)
    return seen


def _lookup(entry: str, gpus: list[PhysicalGPU]) -> PhysicalGPU | None:
    if entry.lstrip("-").isdigit():
        i = int(entry)
        return next((g for g in gpus if g.index == i), None)
    if entry.startswith("MIG-"):
        raise DeviceError(f"MIG device {entry!r} in CUDA_VISIBLE_DEVICES: MIG instances are not supported")
    if entry.startswith("GPU-") and len(entry) > 4:
        matches = [g for g in gpus if g.uuid.startswith(entry)]
        if len(matches) > 1:
            raise DeviceError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is an ambiguous UUID prefix")
        return matches[0] if matches else None
    return None


def physical_gpus() -> list[PhysicalGPU]:
    """Every GPU on this host, from NVML (which ignores CUDA_VISIBLE_DEVICES)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            out.append(PhysicalGPU(i, uuid if isinstance(uuid, str) else uuid.decode(),
                                   name if isinstance(name, str) else name.decode(), f"{major}{minor}"))
        return out
    finally:
        pynvml.nvmlShutdown()


def visible_gpus() -> list[PhysicalGPU]:
    """This process's GPUs in local index order."""
    return parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), physical_gpus())


def local_uuid(local_index: int) -> str:
    """The UUID of the GPU a local CUDA index opens, asked of the CUDA runtime itself."""
    import torch

    return "GPU-" + str(torch.cuda.get_device_properties(local_index).uuid)


def local_index_of(uuid: str) -> int:
    """The local CUDA index of a GPU in this process, or a DeviceError naming what is visible."""
    import torch

    n = torch.cuda.device_count()
    for i in range(n):
        if local_uuid(i) == uuid:
            return i
    visible = [local_uuid(i) for i in range(n)]
    raise DeviceError(f"GPU {uuid} is not visible in this process (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}; visible: {visible})")


DEVICE_CHOICES = ("auto", "cpu", "cuda")  # what --device takes; "auto" never reaches a config document


def cuda_missing_reason() -> str | None:
    """Why this process cannot use a CUDA GPU, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"no CUDA GPU is visible (torch.cuda.is_available() is False; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where this process sees a GPU, else 'cpu'; 'cpu' and 'cuda' as they are."""
    if device not in DEVICE_CHOICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {device!r}")
    if device != "auto":
        return device
    return "cpu" if cuda_missing_reason() else "cuda"


def require_cuda(what: str = "--device cuda") -> None:
    """A DeviceError naming `what` when this process has no CUDA GPU to run it on."""
    reason = cuda_missing_reason()
    if reason is not None:
        raise DeviceError(f"{what}: {reason}")
