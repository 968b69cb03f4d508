"""The tensor-parallel group of one engine: the collectives the model's layers call.

Rendezvous goes through a TCPStore that rank 0 binds to port 0, so the kernel picks the port and
several engines on one machine can never collide; the port travels to the other ranks in their
start-up arguments. The same group object is later the place where faster all-reduce backends plug in.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class TPGroup:
    def __init__(self, rank: int, world_size: int, device: torch.device, pg: dist.ProcessGroup | None):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.pg = pg

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.pg)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along the last dimension on rank 0; other ranks get None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_driver else None
        dist.gather(x, parts, dst=0, group=self.pg)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.pg)

    def destroy(self) -> None:
        if self.pg is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.pg = None


def create_store(world_size: int, host: str = "127.0.0.1") -> dist.TCPStore:
    """Rank 0's store, on a port the kernel chose (read it back from `store.port`)."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=120), wait_for_workers=False)


def init_tp_group(rank: int, world_size: int, device: torch.device, store_host: str, store_port: int,
                  store: dist.TCPStore | None = None) -> TPGroup:
    if world_size == 1:
        return TPGroup(0, 1, device, None)
    if store is None:
        store = dist.TCPStore(store_host, store_port, world_size, is_master=False, timeout=timedelta(seconds=120))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300), device_id=device if device.type == "cuda" else None)
    return TPGroup(rank, world_size, device, dist.group.WORLD)
