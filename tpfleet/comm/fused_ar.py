"""The host side of the all-reduce fused into batch-1 decode kernels (the kernels and the protocol:
tpfleet.kernels.fused_ar): every rank's region, shared over CUDA IPC by the custom all-reduce, the
error record the kernels write when a wait times out, and `check`, which raises it on the host as
the custom all-reduce does. What each site is belongs to the model, which may name them for errors.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tpfleet import env
from tpfleet.comm.custom_ar import CommTimeout
from tpfleet.kernels.fused_ar import RECORD, Exchange, region_bytes

if TYPE_CHECKING:
    from tpfleet.comm.custom_ar import CustomAllReduce


def enabled() -> bool:
    """Whether batch-1 decode fuses its all-reduces: yes unless TPFLEET_FUSED_AR=0. Measured faster than
    the custom all-reduce kernels at TP=2 and TP=4 (docs/benchmarks.md)."""
    return env.FUSED_AR()


class FusedAllReduce:
    """One rank's view of the sites: every rank's region, the epoch, and the timeout record."""

    def __init__(self, regions: list[int], record: tuple[int, int], rank: int, world: int, hidden: int,
                 device: torch.device, timeout_s: float = 30.0, site_name: Callable[[int], str] | None = None):
        """`regions`: each rank's region (`region_bytes` long, zeroed) as addressed from here; `record`:
        (host, device) addresses of RECORD zeroed int64s that the host reads without synchronising;
        `site_name`: what a site is, for errors."""
        if len(regions) != world:
            raise ValueError(f"{len(regions)} regions for {world} ranks")
        self.exchange = Exchange.over(regions, record[1], rank, hidden, device, timeout_s)
        self.site_name = site_name
        self._record = (ctypes.c_int64 * RECORD).from_address(record[0])

    @classmethod
    def over_ipc(cls, car: CustomAllReduce, sites: int, hidden: int, timeout_s: float = 30.0,
                 site_name: Callable[[int], str] | None = None) -> FusedAllReduce:
        """Regions shared by the custom all-reduce, which frees them when it closes. Collective."""
        regions = car.share_region(region_bytes(sites, hidden, car.world))
        record = car.host_mapped(RECORD * 8)
        return cls(regions, record, car.rank, car.world, hidden, car.device, timeout_s, site_name)

    def begin_step(self) -> None:
        """Bump the epoch: called once at the start of every forward that fuses, on every rank."""
        self.exchange.begin_step()

    def check(self) -> None:
        """Raise if a wait timed out. Reads host memory only: no synchronisation."""
        code, site, complete, awaited = self._record
        if code:
            named = f" ({self.site_name(site)})" if self.site_name is not None else ""
            raise CommTimeout(
                f"fused all-reduce: rank {self.exchange.rank} waited more than {self.exchange.timeout_ns / 1e9:.1f}s "
                f"at site {site}{named}: {complete} of {awaited} ranks' values "
                f"arrived; a peer is dead, hung, or running a different sequence of steps")
