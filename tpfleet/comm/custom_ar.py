"""tpfleet's IPC custom all-reduce: the host side of tpfleet/kernels/csrc/custom_all_reduce.cu.

What makes it safe where others fail at start-up:
- its memory comes from cudaMalloc in its own library, never from PyTorch's allocator, so it can be
  exported over IPC whatever PYTORCH_CUDA_ALLOC_CONF says (expandable segments, memory savers);
- inputs are read where they are and pushed to peers, so nothing is registered after graph capture;
- every rank's device is named by UUID; duplicates are refused, the IPC mapping is tested by a real
  open-and-read before use, and a call made on another device than the one it was built for fails
  with both devices named;
- waits time out into an error record instead of hanging.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from tpfleet import env, kernels
from tpfleet.devices import DeviceError, local_uuid
from tpfleet.jit import BuildSpec, build_library, write_atomic
from tpfleet.kernels import pdl

log = logging.getLogger("tpfleet.comm")

MAX_RANKS = 8
_SOURCE = Path(kernels.__file__).parent / "csrc" / "custom_all_reduce.cu"
SOURCE_HASH = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_libs: dict[str, ctypes.CDLL] = {}


class CommError(RuntimeError):
    pass


class CommTimeout(CommError):
    pass


class _Args(ctypes.Structure):
    _fields_ = [("region", ctypes.c_void_p * MAX_RANKS), ("state", ctypes.c_void_p), ("err", ctypes.c_void_p),
                ("inp", ctypes.c_void_p), ("out", ctypes.c_void_p), ("packs", ctypes.c_longlong),
                ("slot_bytes", ctypes.c_longlong), ("timeout_ns", ctypes.c_ulonglong), ("rank", ctypes.c_int),
                ("world", ctypes.c_int), ("dtype", ctypes.c_int), ("two_shot", ctypes.c_int), ("blocks", ctypes.c_int),
                ("threads", ctypes.c_int), ("pdl", ctypes.c_int)]


class _ErrorRecord(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("rank", ctypes.c_int), ("peer", ctypes.c_int), ("block", ctypes.c_int),
                ("barrier", ctypes.c_ulonglong), ("epoch", ctypes.c_ulonglong)]


def load_library(device: torch.device) -> ctypes.CDLL:
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    if arch not in _libs:
        lib = ctypes.CDLL(str(build_library(BuildSpec("custom_all_reduce", _SOURCE, arch))))
        vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.tpf_malloc_zeroed.argtypes = [i, sz, ctypes.POINTER(vp)]
        lib.tpf_host_mapped.argtypes = [i, sz, ctypes.POINTER(vp), ctypes.POINTER(vp)]
        lib.tpf_free.argtypes = [vp]
        lib.tpf_free_host.argtypes = [vp]
        lib.tpf_ipc_handle.argtypes = [vp, vp]
        lib.tpf_ipc_open.argtypes = [i, vp, ctypes.POINTER(vp)]
        lib.tpf_ipc_close.argtypes = [vp]
        lib.tpf_memcpy.argtypes = [i, vp, vp, sz]
        lib.tpf_all_reduce.argtypes = [i, ctypes.POINTER(_Args), vp]
        lib.tpf_error_string.restype = ctypes.c_char_p
        if lib.tpf_args_bytes() != ctypes.sizeof(_Args):
            raise CommError("custom all-reduce: host and device disagree on the argument layout")
        _libs[arch] = lib
    return _libs[arch]


def default_grid(world: int) -> tuple[int, int]:
    """(blocks, threads) per call. More ranks mean more peers to push to: more blocks in flight."""
    return (32, 512) if world <= 2 else (64, 256)


class CustomAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_one_shot_bytes: int = 1 << 20,
                 max_two_shot_bytes: int = 8 << 20, timeout_s: float = 30.0, grid: tuple[int, int] | None = None):
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if not 2 <= self.world <= MAX_RANKS:
            raise CommError(f"custom all-reduce supports 2 to {MAX_RANKS} ranks, not {self.world}")
        self.group = group
        self.device = torch.device(device)
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.uuid = local_uuid(self.index)
        self.max_one_shot_bytes = max_one_shot_bytes
        self.max_two_shot_bytes = max_two_shot_bytes
        self.lib = load_library(self.device)
        self.grid = grid or default_grid(self.world)
        blocks, threads = self.grid
        max_blocks, max_threads = self.lib.tpf_max_blocks(), self.lib.tpf_max_threads()
        if not (1 <= blocks <= max_blocks and 32 <= threads <= max_threads and threads % 32 == 0):
            raise CommError(f"custom all-reduce grid {blocks}x{threads} is out of range: 1..{max_blocks} blocks "
                            f"of 32..{max_threads} threads, a multiple of 32")

        uuids = self._all_gather(self.uuid)
        if len(set(uuids)) != self.world:
            dup = sorted({u for u in uuids if uuids.count(u) > 1})
            raise DeviceError(f"ranks share a GPU ({dup}): every rank needs its own device; "
                              f"the ranks' GPUs are {uuids}")
        self.uuids = uuids

        self.slot_bytes = _round_up(max(max_one_shot_bytes, 2 * (-(-max_two_shot_bytes // self.world)) + 16), 4096)
        self.region_bytes = self.lib.tpf_flags_bytes() + 2 * self.world * self.slot_bytes
        self._owned: list[int] = []  # what close() frees: our cudaMalloc'd memory,
        self._opened: list[int] = []  # the peers' regions we mapped,
        self._hosts: list[int] = []  # and our host-mapped memory
        self._peers = self.share_region(self.region_bytes)
        self._region = self._peers[self.rank]
        self._state = self._alloc(self.lib.tpf_malloc_zeroed, self.index, self.lib.tpf_state_bytes())
        self._owned.append(self._state)
        err_host, err_dev = self.host_mapped(self.lib.tpf_error_bytes())
        self._errors = (_ErrorRecord * self.lib.tpf_max_blocks()).from_address(err_host)
        self._verify_ipc()

        self._args = _Args()
        for r, p in enumerate(self._peers):
            self._args.region[r] = p
        self._args.state, self._args.err = self._state, err_dev
        self._args.slot_bytes = self.slot_bytes
        self._args.timeout_ns = int(timeout_s * 1e9)
        self._args.rank, self._args.world = self.rank, self.world
        self._args.blocks, self._args.threads = self.grid

    # --- set-up helpers ----------------------------------------------------------------------------

    def _call(self, fn, *args) -> None:
        code = fn(*args)
        if code:
            raise CommError(f"rank {self.rank}: {fn.__name__} failed: {self.lib.tpf_error_string(code).decode()}")

    def _alloc(self, fn, *args) -> int:
        p = ctypes.c_void_p()
        self._call(fn, *args, ctypes.byref(p))
        return p.value

    def _all_gather(self, obj):
        objs = [None] * self.world
        dist.all_gather_object(objs, obj, group=self.group)
        return objs

    def share_region(self, nbytes: int) -> list[int]:
        """A new zeroed region of `nbytes` on every rank, exported over IPC: its address on each rank
        as mapped in this process (our own included), in rank order. Freed by `close`."""
        region = self._alloc(self.lib.tpf_malloc_zeroed, self.index, nbytes)
        self._owned.append(region)
        handle = ctypes.create_string_buffer(64)
        self._call(self.lib.tpf_ipc_handle, region, handle)
        handles = self._all_gather(handle.raw)
        peers: list[int] = []
        problems = []
        for r, h in enumerate(handles):
            p = ctypes.c_void_p(region if r == self.rank else None)
            code = 0 if r == self.rank else self.lib.tpf_ipc_open(self.index, h, ctypes.byref(p))
            if code:
                problems.append(f"rank {self.rank} ({self.uuid}) cannot open rank {r}'s ({self.uuids[r]}) IPC memory: "
                                f"{self.lib.tpf_error_string(code).decode()}")
            elif r != self.rank:
                self._opened.append(p.value)
            peers.append(p.value or 0)
        # Agree before going on: a rank that raised alone would leave its peers waiting in a collective.
        problems = [m for per_rank in self._all_gather(problems) for m in per_rank]
        if problems:
            self.close()
            raise CommError("; ".join(problems))
        return peers

    def host_mapped(self, nbytes: int) -> tuple[int, int]:
        """Zeroed host memory the device writes and the host reads without synchronising: (host, device)
        addresses. Freed by `close`."""
        host, dev = ctypes.c_void_p(), ctypes.c_void_p()
        self._call(self.lib.tpf_host_mapped, self.index, nbytes, ctypes.byref(host), ctypes.byref(dev))
        self._hosts.append(host.value)
        return host.value, dev.value

    def _verify_ipc(self) -> None:
        """Write a pattern into our own slots, read every peer's through its mapping, compare."""
        key = ",".join(sorted(self.uuids))
        cache = env.cache_root() / "ipc_checks.json"
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if known.get(key):
            return
        slot0 = self._region + self.lib.tpf_flags_bytes()
        pattern = bytes([self.rank + 1]) * 256
        self._call(self.lib.tpf_memcpy, self.index, slot0, pattern, len(pattern))
        dist.barrier(group=self.group)
        bad = []
        buf = ctypes.create_string_buffer(256)
        for r, p in enumerate(self._peers):
            if r == self.rank:
                continue
            code = self.lib.tpf_memcpy(self.index, buf, p + self.lib.tpf_flags_bytes(), 256)
            if code or buf.raw != bytes([r + 1]) * 256:
                bad.append(f"{self.uuid} -> {self.uuids[r]}")
        dist.barrier(group=self.group)
        self._call(self.lib.tpf_memcpy, self.index, slot0, bytes(256), 256)
        failures = [b for per_rank in self._all_gather(bad) for b in per_rank]
        if failures:
            self.close()
            raise CommError(f"IPC reads returned wrong data between {failures}: P2P is not usable here")
        if self.rank == 0:
            known[key] = True
            write_atomic(cache, json.dumps(known))

    # --- use ----------------------------------------------------------------------------------------

    def supports(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.dtype in _DTYPES and x.is_cuda and x.is_contiguous() and nbytes % 16 == 0 and nbytes > 0
                and nbytes <= self.max_two_shot_bytes)

    def check(self) -> None:
        """Raise if any wait has timed out. Reads host memory only: no synchronisation."""
        for e in self._errors[:self.grid[0]]:  # one record per block of the grid
            if e.code:
                raise CommTimeout(
                    f"custom all-reduce: rank {e.rank} ({self.uuid}) waited more than "
                    f"{self._args.timeout_ns / 1e9:.1f}s for rank {e.peer} ({self.uuids[e.peer]}) at call "
                    f"{e.epoch + 1}, barrier {e.barrier}, block {e.block}: that rank is dead, hung, or "
                    f"running a different sequence of collectives")

    def all_reduce(self, x: torch.Tensor, two_shot: bool | None = None) -> torch.Tensor:
        """Sum over ranks into a new tensor. CUDA-graph safe: nothing host-side changes between calls."""
        self.check()
        current = torch.cuda.current_device()
        if current != self.index or x.device.index != self.index:
            raise DeviceError(f"custom all-reduce was created for cuda:{self.index} ({self.uuid}) but is called "
                              f"with cuda:{current} ({local_uuid(current)}) current and the input on {x.device}")
        if not self.supports(x):
            raise CommError(f"custom all-reduce cannot take a {x.dtype} tensor of {x.numel()} elements "
                            f"(contiguous, 16-byte multiple, at most {self.max_two_shot_bytes} bytes)")
        nbytes = x.numel() * x.element_size()
        if two_shot is None:
            two_shot = nbytes > self.max_one_shot_bytes
        elif not two_shot and nbytes > self.max_one_shot_bytes:
            raise CommError(f"one-shot all-reduce is limited to {self.max_one_shot_bytes} bytes")
        out = torch.empty_like(x)
        a = self._args
        a.inp, a.out, a.packs = x.data_ptr(), out.data_ptr(), nbytes // 16
        a.dtype, a.two_shot = _DTYPES[x.dtype], int(two_shot)
        a.pdl = int(x.dim() == 2 and pdl.enabled(x.device, x.shape[0]))  # one row of hidden states: batch-1 decode
        code = self.lib.tpf_all_reduce(self.index, ctypes.byref(a), torch.cuda.current_stream(x.device).cuda_stream)
        if code:
            raise CommError(f"custom all-reduce launch failed: {self.lib.tpf_error_string(code).decode()}")
        return out

    def close(self) -> None:
        if not (self._owned or self._hosts):
            return
        torch.cuda.synchronize(self.index)
        for p in self._opened:
            self.lib.tpf_ipc_close(p)
        for p in self._owned:
            self.lib.tpf_free(p)
        for p in self._hosts:
            self.lib.tpf_free_host(p)
        self._opened, self._owned, self._hosts = [], [], []
        self._peers, self._region = [], 0


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
