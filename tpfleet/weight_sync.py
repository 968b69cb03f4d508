"""The trainer's side of pushing new weights into running tpfleet engines.

Two ways, both named after SGLang's routes:

**Colocated (`/update_weights_from_tensor`)**: the trainer shares its tensors on the same host and
posts one payload string per engine TP rank (or one for all ranks) in `serialized_named_tensors`.
Nothing in a payload is code: it is JSON, optionally base64-encoded, and the engine never unpickles
anything. The document:

    {"format": "tpfleet-weights",            # FORMAT_TAG
     "version": 1,                           # FORMAT_VERSION
     "buckets": [                            # at most MAX_BUCKETS
       {"transport": "shm",                  # a POSIX shared-memory segment (CPU)
        "shm_name": "psm_4f2a9c",            # [A-Za-z0-9_.-]{1,128}, no slash
        "nbytes": 1048576,                   # bytes of the bucket, at most the segment's size
        "tensors": [{"name": "model.layers.0.self_attn.q_proj.weight",
                     "dtype": "bfloat16",    # float32 | float16 | bfloat16 ("torch." prefix allowed)
                     "shape": [2048, 1024],
                     "offset": 0},           # byte offset in the bucket, a multiple of the item size
                    ...]},
       {"transport": "cuda_ipc",             # one CUDA allocation's storage (GPU)
        "nbytes": 1048576,
        "cuda_ipc": {"device_uuid": "GPU-…",  # the engine rank maps it to its own device index
                     "handle": "<base64>",    # the fields of torch's UntypedStorage._share_cuda_(),
                     "storage_size_bytes": 1048576,   # bytes as base64, in that order
                     "storage_offset_bytes": 0,
                     "ref_counter_handle": "<base64>",
                     "ref_counter_offset": 0,
                     "event_handle": "<base64>",
                     "event_sync_required": true},
        "tensors": [...]}]}

A tensor's bytes are `shape`'s product times the item size, starting at `offset`, in C order, and
must lie inside `nbytes`. `load_format: "flattened_bucket"` means a few large buckets holding many
tensors (what `FlattenedBucketSender` builds); `load_format: null` accepts the same document, where a
bucket per tensor is simply the degenerate case. The engine checks the whole document (tag,
version, dtypes, shapes, offsets, sizes, segment names, tensor names against its model) before it
opens any buffer, opens every buffer on every rank before it changes any parameter, and answers
400 naming the field at fault otherwise. A tensor's `dtype` says how to read its bytes; the engine
converts it to its parameter's dtype, as a checkpoint of another dtype is converted on load, so bytes
described with the wrong dtype load as wrong values. Keep the sender alive until the engine has answered.

**Over a collective (`/init_weights_update_group`, `/update_weights_from_distributed`)**: the
trainer is rank 0 of a new group, engine TP rank r of an engine is `rank_offset + r`. The group is
built the way SGLang's `init_custom_process_group` (and Miles' and slime's copy of it) builds
one over a `tcp://` rendezvous: TCPStore → PrefixStore(group_name) → PrefixStore(group_name + "/")
→ PrefixStore(device + "/") → one gloo or NCCL backend. Both sides use the same store keys, so a
trainer using those helpers joins a tpfleet engine's group (tests/test_weight_updates.py does it)
and a trainer using `init_weights_update_group` here can lead SGLang engines.
The group is independent of every default process group: neither side needs one, neither side's
is touched. Each `/update_weights_from_distributed` names tensors in order; the trainer then
broadcasts each full tensor from rank 0 (`broadcast_weights`), or with `load_format:
"flattened_bucket"` one flat tensor of their concatenation (one dtype per bucket).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from datetime import timedelta
from multiprocessing import shared_memory

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

FORMAT_TAG = "tpfleet-weights"
FORMAT_VERSION = 1
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16}
MAX_BUCKETS = 4096
MAX_TENSORS = 1 << 20
DEFAULT_BUCKET_BYTES = 512 << 20
ALIGNMENT = 256  # every tensor starts on this byte boundary: any dtype, and vector loads, fit
DEFAULT_GROUP_TIMEOUT = timedelta(minutes=30)


def dtype_name(dtype: torch.dtype) -> str:
    """The name a payload or an update request uses for `dtype` ("bfloat16")."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"weights travel as {', '.join(DTYPES)}, not {name}")
    return name


# --- colocated: buckets of tensors shared on this host --------------------------------------------

class _Bucket:
    """One contiguous buffer and the tensors packed in it; shared until `close`."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], device: torch.device):
        self.entries, nbytes = [], 0
        for name, tensor in named:
            nbytes = -(-nbytes // ALIGNMENT) * ALIGNMENT
            self.entries.append({"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                                 "offset": nbytes})
            nbytes += tensor.numel() * tensor.element_size()
        self.nbytes = max(nbytes, 1)
        self.shm: shared_memory.SharedMemory | None = None
        if device.type == "cuda":
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        else:
            self.shm = shared_memory.SharedMemory(create=True, size=self.nbytes)
            self.buffer = torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=self.nbytes)
        for entry, (_, tensor) in zip(self.entries, named):
            self.write(entry, tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the engine reads the buffer from another process

    def write(self, entry: dict, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.buffer[entry["offset"]:entry["offset"] + size].copy_(flat, non_blocking=self.buffer.is_cuda)

    def describe(self) -> dict:
        doc = {"nbytes": self.nbytes, "tensors": self.entries}
        if self.shm is not None:
            return {"transport": "shm", "shm_name": self.shm.name, **doc}
        from tpfleet.devices import local_uuid

        (device, handle, size, offset, ref_handle, ref_offset, event_handle,
         event_sync) = self.buffer.untyped_storage()._share_cuda_()
        return {"transport": "cuda_ipc", **doc,
                "cuda_ipc": {"device_uuid": local_uuid(device), "handle": _base64(handle),
                             "storage_size_bytes": int(size), "storage_offset_bytes": int(offset),
                             "ref_counter_handle": _base64(ref_handle), "ref_counter_offset": int(ref_offset),
                             "event_handle": _base64(event_handle), "event_sync_required": bool(event_sync)}}

    def close(self) -> None:
        self.buffer = None  # the view must go before the segment can close
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


def _base64(raw: bytes | None) -> str:
    return base64.b64encode(raw or b"").decode()


class FlattenedBucketSender:
    """Pack named tensors into buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its
    own), in shared memory on CPU or one CUDA buffer each on `device`; `payload()` describes them.
    The buffers live until `close()` (or the end of a `with` block): keep the sender until the engine
    has answered the update request."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], device: str | torch.device = "cpu",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        device = torch.device(device)
        self.buckets: list[_Bucket] = []
        try:
            pending, size = [], 0
            for name, tensor in named_tensors:
                nbytes = tensor.numel() * tensor.element_size()
                if pending and size + nbytes > bucket_bytes:
                    self.buckets.append(_Bucket(pending, device))
                    pending, size = [], 0
                pending.append((name, tensor.to(device)))
                size += -(-nbytes // ALIGNMENT) * ALIGNMENT
            if pending:
                self.buckets.append(_Bucket(pending, device))
        except BaseException:
            self.close()
            raise

    def refill(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """New values for the same tensors (names, dtypes and shapes, in the same order), written into
        the same buffers: the payload stays valid, so a trainer packs once per step and the engine
        opens the same handles. Everything is checked before anything is written; returns when the
        buffers hold the values."""
        slots = [(bucket, entry) for bucket in self.buckets for entry in bucket.entries]
        named = list(named_tensors)
        if len(named) != len(slots):
            raise ValueError(f"refill: {len(named)} tensors given, the buckets hold {len(slots)}")
        for index, ((_, entry), (name, tensor)) in enumerate(zip(slots, named)):
            if (name, dtype_name(tensor.dtype), list(tensor.shape)) != (entry["name"], entry["dtype"], entry["shape"]):
                raise ValueError(f"refill: tensor {index} is {name} {dtype_name(tensor.dtype)} {list(tensor.shape)}, "
                                 f"the buckets hold {entry['name']} {entry['dtype']} {entry['shape']} there")
        for (bucket, entry), (_, tensor) in zip(slots, named):
            bucket.write(entry, tensor)
        for bucket in self.buckets:
            if bucket.buffer.is_cuda:
                torch.cuda.synchronize(bucket.buffer.device)

    def payload(self, base64_encoded: bool = False) -> str:
        """The document for one TP rank (see the module docstring); JSON text, or base64 of it."""
        text = json.dumps({"format": FORMAT_TAG, "version": FORMAT_VERSION,
                           "buckets": [bucket.describe() for bucket in self.buckets]}, separators=(",", ":"))
        return base64.b64encode(text.encode()).decode() if base64_encoded else text

    def close(self) -> None:
        for bucket in self.buckets:
            bucket.close()
        self.buckets = []

    def __enter__(self) -> FlattenedBucketSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def update_weights_from_tensor_request(payloads: list[str], weight_version: str | None = None,
                                       load_format: str | None = "flattened_bucket") -> dict:
    """The JSON body of POST /update_weights_from_tensor: one payload per TP rank, or one for all."""
    return {"serialized_named_tensors": payloads, "load_format": load_format, "flush_cache": True,
            "weight_version": weight_version}


# --- over a collective group: the trainer is rank 0 --------------------------------------------------

class WeightUpdateGroup:
    """A collective group for weight updates, apart from any default process group. Construction
    blocks until every member has joined."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, group_name: str, backend: str,
                 timeout: timedelta = DEFAULT_GROUP_TIMEOUT):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', not {backend!r}")
        self.rank, self.world_size, self.group_name, self.backend = rank, world_size, group_name, backend
        self.store = store  # a TCPStore server (rank 0) must outlive the group
        group_store = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))
        # Pure "gloo" or "nccl" maps every device to one backend: torch builds one, under the first device
        first_device = next(iter(BackendConfig(backend).get_device_backend_map()))
        backend_store = dist.PrefixStore(f"{first_device}/", group_store)
        if backend == "gloo":
            self._backend = dist.ProcessGroupGloo(backend_store, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._backend = dist.ProcessGroupNCCL(backend_store, rank, world_size, options)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> dist.Work:
        """Start broadcasting `tensor` (contiguous) from rank `src`; wait on the returned work."""
        return self._backend.broadcast(tensor, src)

    def destroy(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None and self.backend == "nccl":
            backend.shutdown()


def trainer_store(master_address: str, master_port: int, world_size: int,
                  timeout: timedelta = DEFAULT_GROUP_TIMEOUT) -> dist.TCPStore:
    """The rendezvous store the trainer serves as rank 0. `master_port=0` lets the kernel pick a port
    (read it from `.port`) to send to the engines before joining the group."""
    return dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout,
                         wait_for_workers=False)


def init_weights_update_group(master_address: str, master_port: int, world_size: int,
                              group_name: str = "weight_update_group", backend: str = "nccl",
                              store: dist.TCPStore | None = None,
                              timeout: timedelta = DEFAULT_GROUP_TIMEOUT) -> WeightUpdateGroup:
    """Join (as rank 0) the group that engines join through POST /init_weights_update_group with the
    same address, port, world size and name. Blocks until they have: post to the engines first
    (from another thread), then call this."""
    store = store or trainer_store(master_address, master_port, world_size, timeout)
    return WeightUpdateGroup(store, 0, world_size, group_name, backend, timeout)


def update_weights_from_distributed_request(named_tensors: list[tuple[str, torch.Tensor]], group_name: str,
                                            weight_version: str | None = None,
                                            load_format: str | None = None) -> dict:
    """The JSON body of POST /update_weights_from_distributed for these tensors, in this order."""
    return {"names": [name for name, _ in named_tensors],
            "dtypes": [dtype_name(tensor.dtype) for _, tensor in named_tensors],
            "shapes": [list(tensor.shape) for _, tensor in named_tensors],
            "group_name": group_name, "weight_version": weight_version, "load_format": load_format,
            "flush_cache": True}


def broadcast_weights(group: WeightUpdateGroup, named_tensors: list[tuple[str, torch.Tensor]],
                      load_format: str | None = None) -> None:
    """Send the tensors an update request named, in its order, from rank 0. With
    `load_format="flattened_bucket"` they go as one flat tensor (they must share one dtype)."""
    tensors = [tensor.detach().contiguous() for _, tensor in named_tensors]
    if load_format == "flattened_bucket":
        if len({tensor.dtype for tensor in tensors}) > 1:
            raise ValueError("a flattened bucket holds tensors of one dtype")
        tensors = [torch.cat([tensor.reshape(-1) for tensor in tensors])] if tensors else []
    works = [group.broadcast(tensor) for tensor in tensors]
    for work in works:
        work.wait()
