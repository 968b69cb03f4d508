"""The tensor-parallel group of one engine: the collectives the model's layers call.

Rendezvous goes through a TCPStore that rank 0 binds to port 0 on the loopback address, so the
kernel picks the port, several engines on one machine can never collide, and no other machine can
reach it; the port travels to the other ranks in their start-up arguments. The same group object
is later the place where faster all-reduce backends plug in.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from tpfleet.comm.communicator import Communicator
    from tpfleet.comm.fused_ar import FusedAllReduce


class TPGroup:
    def __init__(self, rank: int, world_size: int, device: torch.device, pg: dist.ProcessGroup | None,
                 comm: Communicator | None = None):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.pg = pg
        self.comm = comm  # GPU groups: custom all-reduce, symmetric memory and NCCL, picked by size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group. Returns the sum, which may or may not be `x` itself."""
        if self.world_size == 1:
            return x
        if self.comm is not None:
            return self.comm.all_reduce(x)
        dist.all_reduce(x, group=self.pg)
        return x

    def fused_all_reduce(self, sites: int, hidden: int, dtype: torch.dtype, fusable: bool,
                         site_name: Callable[[int], str] | None = None) -> FusedAllReduce | None:
        """The sites of batch-1 all-reduces fused into the GEMVs, or None where they cannot be: one
        rank, no custom all-reduce, `fusable` False on some rank, or turned off
        (tpfleet.comm.fused_ar.enabled). `site_name` names a site in a timeout's error. Collective."""
        if self.comm is None:
            return None
        return self.comm.fused_all_reduce(sites, hidden, dtype, fusable, site_name)

    def input_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Where to write a tensor that will be all-reduced next (zero copy), or None for anywhere."""
        return self.comm.input_buffer(shape, dtype) if self.comm is not None else None

    def check(self) -> None:
        """Raise if a collective timed out; cheap enough to call after every step."""
        if self.comm is not None:
            self.comm.check()

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's `x` along the last dimension on rank 0; other ranks get None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_driver else None
        dist.gather(x, parts, dst=0, group=self.pg)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def broadcast_from_driver(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place; stream-ordered, so the host does not wait."""
        if self.world_size > 1:
            dist.broadcast(x, src=0, group=self.pg)
        return x

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.pg)

    def destroy(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None
        if self.pg is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.pg = None


def create_store(world_size: int, host: str = "127.0.0.1") -> dist.TCPStore:
    """Rank 0's store, on a port the kernel chose (read it back from `store.port`), listening on `host`
    only. TCPStore itself would listen on every interface whatever its host argument (that only tells
    clients where to connect), letting anyone who can reach the machine write into the rendezvous, so
    the listening socket is bound here and handed over."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(world_size + 16)
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timedelta(seconds=120),
                         wait_for_workers=False, master_listen_fd=sock.detach())


def init_tp_group(rank: int, world_size: int, device: torch.device, store_host: str, store_port: int,
                  store: dist.TCPStore | None = None, dtype: torch.dtype = torch.bfloat16,
                  enable_custom: bool = True, enable_symm_mem: bool = True) -> TPGroup:
    if world_size == 1:
        return TPGroup(0, 1, device, None)
    if store is None:
        store = dist.TCPStore(store_host, store_port, world_size, is_master=False, timeout=timedelta(seconds=120))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300), device_id=device if device.type == "cuda" else None)
    comm = None
    if device.type == "cuda":
        from tpfleet.comm.communicator import Communicator

        comm = Communicator(dist.group.WORLD, device, dtype, enable_custom=enable_custom,
                            enable_symm_mem=enable_symm_mem)
    return TPGroup(rank, world_size, device, dist.group.WORLD, comm)
