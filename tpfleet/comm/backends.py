"""All-reduce backends behind one small interface, so the dispatcher can pick by measured speed.

Each backend sums a tensor over the group and returns the result (which may be the input, summed
in place). `supports` says whether it can take a given tensor; the dispatcher never routes a
tensor to a backend that cannot.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from tpfleet.comm.custom_ar import SOURCE_HASH, CustomAllReduce

log = logging.getLogger("tpfleet.comm")


class Backend:
    name: str

    @property
    def tuning_key(self) -> str:
        """What a cached dispatch table measured: a change here must invalidate the table."""
        return self.name

    def supports(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ProcessGroupBackend(Backend):
    """NCCL on GPUs, gloo on CPUs: always available, the fallback for everything."""

    def __init__(self, pg: dist.ProcessGroup, name: str):
        self.pg, self.name = pg, name

    def supports(self, x: torch.Tensor) -> bool:
        return True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.pg)
        return x


class CustomBackend(Backend):
    def __init__(self, car: CustomAllReduce, two_shot: bool):
        self.car, self.two_shot = car, two_shot
        self.name = "custom_two_shot" if two_shot else "custom_one_shot"
        self.limit = car.max_two_shot_bytes if two_shot else car.max_one_shot_bytes

    @property
    def tuning_key(self) -> str:
        blocks, threads = self.car.grid
        return f"{self.name}@{blocks}x{threads}.{SOURCE_HASH}"

    def supports(self, x: torch.Tensor) -> bool:
        return self.car.supports(x) and x.numel() * x.element_size() <= self.limit

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.car.all_reduce(x, two_shot=self.two_shot)


class SymmMemBuffer:
    """One symmetric allocation per group, shared by the one-shot and two-shot backends.

    torch names the store keys of a rendezvous by how many rendezvous the *process* has made
    (pytorch#196082), so ranks whose processes made different numbers wait for each other's keys
    at different names. That happens to the second engine made in one process, whose fresh worker
    processes have made none. `rendezvous_made` counts this process's, so that the communicator
    can compare them across ranks first and skip symmetric memory instead of stalling."""

    rendezvous_made = 0

    def __init__(self, pg: dist.ProcessGroup, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = pg.group_name
        self.max_bytes = max_bytes
        symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buf = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        SymmMemBuffer.rendezvous_made += 1
        symm_mem.rendezvous(self.buf, self.group_name)

    def view(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.buf[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def holds(self, x: torch.Tensor) -> bool:
        return x.data_ptr() == self.buf.data_ptr()


class SymmMemBackend(Backend):
    """PyTorch symmetric memory. Zero copy when the producer wrote into `SymmMemBuffer.view`
    (see Communicator.input_buffer); otherwise the input is copied in, which is graph-safe too.
    Multicast stays off: TORCH_SYMM_MEM_DISABLE_MULTICAST=1, and no multimem op is used."""

    def __init__(self, shared: SymmMemBuffer, two_shot: bool):
        self.shared = shared
        self.two_shot = two_shot
        self.name = "symm_mem_two_shot" if two_shot else "symm_mem_one_shot"

    def supports(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.is_cuda and x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16, torch.float32) \
            and nbytes <= self.shared.max_bytes and nbytes % 16 == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        buf = x
        if not self.shared.holds(x):
            buf = self.shared.view(tuple(x.shape), x.dtype)
            buf.copy_(x)
        g = self.shared.group_name
        if self.two_shot:
            out = torch.empty_like(buf)
            torch.ops.symm_mem.two_shot_all_reduce_out(buf, "sum", g, out)
            return out
        return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", g)
