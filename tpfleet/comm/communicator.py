"""The GPU communicator of a TP group: every backend that works here, and the dispatcher over them.

Availability is agreed by all ranks before use: if the custom kernels cannot be built or fail their
self-test on any rank, no rank uses them (a rank calling a different backend than its peers would
deadlock). Each fallback is logged once, with its reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from tpfleet.comm.backends import Backend, CustomBackend, ProcessGroupBackend, SymmMemBackend, SymmMemBuffer
from tpfleet.comm.custom_ar import CommError, CustomAllReduce, load_library
from tpfleet.comm.dispatch import DispatchTable, load_or_tune
from tpfleet.comm.fused_ar import FusedAllReduce
from tpfleet.comm.fused_ar import enabled as fused_enabled
from tpfleet.devices import DeviceError
from tpfleet.jit import JitUnavailable
from tpfleet.kernels.fused_ar import supports as fused_supports

log = logging.getLogger("tpfleet.comm")


def _mode() -> str:
    """Which dispatch table applies: launch overhead differs inside a CUDA graph."""
    return "graph" if torch.cuda.is_current_stream_capturing() else "eager"


class Communicator:
    def __init__(self, pg: dist.ProcessGroup, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 enable_custom: bool = True, enable_symm_mem: bool = True, table: DispatchTable | None = None,
                 timeout_s: float = 30.0, symm_mem_bytes: int = 64 << 20):
        self.pg = pg
        self.device = device
        self.rank, self.world = dist.get_rank(pg), dist.get_world_size(pg)
        self.backends: dict[str, Backend] = {"nccl": ProcessGroupBackend(pg, "nccl")}
        self.disabled: dict[str, str] = {}
        self.custom: CustomAllReduce | None = None
        self.symm: SymmMemBuffer | None = None
        self.fused: FusedAllReduce | None = None
        self.timeout_s = timeout_s
        if enable_custom:
            self._add_custom(timeout_s)
        if enable_symm_mem:
            self._add_symm_mem(symm_mem_bytes)
        self.table = table or load_or_tune(self.backends, pg, device, dtype)

    def _all_gather(self, obj) -> list:
        objs = [None] * self.world
        dist.all_gather_object(objs, obj, group=self.pg)
        return objs

    def _agree(self, ok: bool, reason: str) -> str | None:
        """None if every rank is ok, else the first failing rank's reason."""
        return next((v for v in self._all_gather(None if ok else f"rank {self.rank}: {reason}") if v), None)

    def _disable(self, name: str, reason: str, level: int = logging.WARNING) -> None:
        self.disabled[name] = reason
        if self.rank == 0:
            log.log(level, "%s all-reduce disabled, falling back: %s", name, reason)

    def _add_custom(self, timeout_s: float) -> None:
        reason = ""
        try:
            load_library(self.device)
        except (JitUnavailable, OSError) as e:
            reason = str(e)
        failed = self._agree(not reason, reason)
        if failed:
            return self._disable("custom", failed)
        try:
            car = CustomAllReduce(self.pg, self.device, timeout_s=timeout_s)
        except DeviceError:
            raise  # two ranks on one GPU is a launch bug, not something to paper over
        except CommError as e:
            return self._disable("custom", str(e))
        mismatch = self._self_test(car)
        failed = self._agree(mismatch is None, mismatch or "")
        if failed:
            car.close()
            return self._disable("custom", f"self-test failed: {failed}")
        self.custom = car
        for two_shot in (False, True):
            b = CustomBackend(car, two_shot)
            self.backends[b.name] = b

    def _self_test(self, car: CustomAllReduce) -> str | None:
        """A few all-reduces of small integers, whose sums every dtype represents exactly."""
        gen = torch.Generator(device=self.device).manual_seed(1234 + self.rank)
        for numel, two_shot in ((4096, False), (64 * 1024, True), (4096, True)):
            x = torch.randint(-8, 8, (numel,), generator=gen, device=self.device).to(torch.bfloat16)
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x, group=self.pg)
            expected = torch.stack(parts).double().sum(0).to(torch.bfloat16)
            got = car.all_reduce(x, two_shot=two_shot)
            torch.cuda.synchronize(self.device)
            if not torch.equal(got, expected):
                bad = (got != expected).sum().item()
                return f"{bad} of {numel} elements wrong ({'two' if two_shot else 'one'}-shot)"
        return None

    def _add_symm_mem(self, max_bytes: int) -> None:
        made = self._all_gather(SymmMemBuffer.rendezvous_made)
        if len(set(made)) > 1:
            return self._disable("symm_mem", f"the ranks' processes have made {made} symmetric-memory rendezvous; "
                                             "torch keys the next one by that count, so it would stall (see "
                                             "SymmMemBuffer). Start each engine in fresh processes to use it")
        reason = ""
        try:
            self.symm = SymmMemBuffer(self.pg, self.device, max_bytes)
        except Exception as e:  # noqa: BLE001 - any failure here means: not on this machine
            reason = f"{type(e).__name__}: {e}"
        failed = self._agree(not reason, reason)
        if failed:
            self.symm = None
            return self._disable("symm_mem", failed)
        for two_shot in (False, True):
            b = SymmMemBackend(self.symm, two_shot)
            self.backends[b.name] = b

    def fused_all_reduce(self, sites: int, hidden: int, dtype: torch.dtype, fusable: bool,
                         site_name: Callable[[int], str] | None = None) -> FusedAllReduce | None:
        """See TPGroup.fused_all_reduce. Its regions come from the custom all-reduce, which must work.
        Not fusing is a supported configuration, not a failure: it is logged as information."""
        if not fusable:
            reason = "the model's projections do not fit the GEMV kernel"
        elif not fused_supports(dtype):
            reason = f"its words carry 16-bit values, and the model runs in {dtype}"
        elif not fused_enabled():
            reason = "turned off by TPFLEET_FUSED_AR=0"
        else:
            reason = "" if self.custom is not None else "the custom all-reduce, whose memory it shares, is unavailable"
        failed = self._agree(not reason, reason)
        if failed:
            self._disable("fused", failed, logging.INFO)
            return None
        self.fused = FusedAllReduce.over_ipc(self.custom, sites, hidden, self.timeout_s, site_name)
        return self.fused

    def input_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, mode: str | None = None) -> torch.Tensor | None:
        """Where a producer (a row-parallel GEMM) should write a tensor it will all-reduce next, or
        None for anywhere. Only symmetric memory needs its input in its own buffer; the custom
        kernels and NCCL read inputs wherever they are. `mode` (eager or graph) defaults to whether
        a graph is being captured now."""
        if self.symm is None:
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        if self.table.pick(nbytes, mode or _mode()).startswith("symm_mem") and nbytes <= self.symm.max_bytes:
            return self.symm.view(shape, dtype)
        return None

    def pick(self, x: torch.Tensor) -> Backend:
        b = self.backends.get(self.table.pick(x.numel() * x.element_size(), _mode()))
        return b if b is not None and b.supports(x) else self.backends["nccl"]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(x).all_reduce(x)

    def check(self) -> None:
        if self.custom is not None:
            self.custom.check()
        if self.fused is not None:
            self.fused.check()

    def close(self) -> None:
        self.fused = None  # its memory belongs to the custom all-reduce
        if self.custom is not None:
            self.custom.close()
            self.custom = None
