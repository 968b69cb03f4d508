"""The engine's side of a colocated weight payload (the format is documented in tpfleet.weight_sync).

`parse_payload` turns a payload string into plain checked data without touching any buffer; only
then does `OpenBucket` map a bucket's shared memory or CUDA allocation and view its tensors.
Nothing here unpickles or evaluates anything: a payload is JSON, its binary fields base64.
"""

from __future__ import annotations

import _posixshmem
import base64
import binascii
import json
import math
import mmap
import os
import re
import warnings
from dataclasses import dataclass

import torch

from tpfleet.engine.sequence import InvalidRequest
from tpfleet.weight_sync import DTYPES, FORMAT_TAG, FORMAT_VERSION, MAX_BUCKETS, MAX_TENSORS

MAX_PAYLOAD_CHARS = 256 << 20
MAX_NAME_CHARS = 512
MAX_DIMS = 8
MAX_BUCKET_BYTES = 1 << 44
MAX_HANDLE_BYTES = 4096
SHM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
DEVICE_UUID = re.compile(r"GPU-[0-9A-Fa-f-]{8,64}")
_IPC_FIELDS = ("device_uuid", "handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle",
               "ref_counter_offset", "event_handle", "event_sync_required")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    field: str  # where it sits in the request, for errors found later (e.g. against the model)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class BucketSpec:
    transport: str  # "shm" or "cuda_ipc"
    nbytes: int
    tensors: tuple[TensorEntry, ...]
    field: str
    shm_name: str | None = None
    cuda_ipc: tuple | None = None  # _IPC_FIELDS' values, binary ones decoded


def parse_dtype_name(value: object, field: str) -> torch.dtype:
    """A dtype from the whitelist by name ("bfloat16" or "torch.bfloat16")."""
    if not isinstance(value, str) or value.removeprefix("torch.") not in DTYPES:
        raise InvalidRequest(field, f"dtype must be one of {', '.join(DTYPES)}, not {_short(value)}")
    return DTYPES[value.removeprefix("torch.")]


def parse_shape(value: object, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 1 << 40 for d in value):
        raise InvalidRequest(field, f"a shape is a list of at most {MAX_DIMS} non-negative integers, "
                                    f"not {_short(value)}")
    return tuple(value)


def parse_payload(text: object, field: str) -> list[BucketSpec]:
    """Check a whole payload document and return its buckets; raises InvalidRequest naming the field."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_PAYLOAD_CHARS:
        raise InvalidRequest(field, f"a payload is a non-empty string of at most {MAX_PAYLOAD_CHARS} characters")
    doc = _decode(text, field)
    _keys(doc, {"format", "version", "buckets"}, field)
    if doc["format"] != FORMAT_TAG:
        raise InvalidRequest(f"{field}.format", f"must be {FORMAT_TAG!r}, not {_short(doc['format'])}")
    if doc["version"] != FORMAT_VERSION or not _is_int(doc["version"]):
        raise InvalidRequest(f"{field}.version",
                             f"this engine reads version {FORMAT_VERSION}, not {_short(doc['version'])}")
    buckets = doc["buckets"]
    if not isinstance(buckets, list) or not 0 < len(buckets) <= MAX_BUCKETS:
        raise InvalidRequest(f"{field}.buckets", f"must be a list of 1 to {MAX_BUCKETS} buckets")
    parsed = [_bucket(bucket, f"{field}.buckets[{i}]") for i, bucket in enumerate(buckets)]
    seen: set[str] = set()
    count = 0
    for bucket in parsed:
        count += len(bucket.tensors)
        for entry in bucket.tensors:
            if entry.name in seen:
                raise InvalidRequest(f"{entry.field}.name", f"tensor {entry.name!r} appears twice")
            seen.add(entry.name)
    if count > MAX_TENSORS:
        raise InvalidRequest(f"{field}.buckets", f"{count} tensors; at most {MAX_TENSORS}")
    return parsed


def _decode(text: str, field: str) -> dict:
    """JSON text, or base64 of JSON text."""
    raw = text.strip()
    try:
        if not raw.startswith("{"):
            raw = base64.b64decode(raw, validate=True).decode("utf-8")
        doc = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest(field, f"not a {FORMAT_TAG} document: expected JSON or base64 of JSON "
                                    "(see tpfleet.weight_sync); nothing was deserialized") from None
    if not isinstance(doc, dict):
        raise InvalidRequest(field, f"a {FORMAT_TAG} document is a JSON object")
    return doc


def _bucket(doc: object, field: str) -> BucketSpec:
    if not isinstance(doc, dict) or doc.get("transport") not in ("shm", "cuda_ipc"):
        raise InvalidRequest(f"{field}.transport", "must be 'shm' or 'cuda_ipc'")
    transport = doc["transport"]
    _keys(doc, {"transport", "nbytes", "tensors", "shm_name" if transport == "shm" else "cuda_ipc"}, field)
    nbytes = doc["nbytes"]
    if not _is_int(nbytes) or not 0 < nbytes <= MAX_BUCKET_BYTES:
        raise InvalidRequest(f"{field}.nbytes", f"must be an integer in [1, {MAX_BUCKET_BYTES}]")
    tensors = doc["tensors"]
    if not isinstance(tensors, list) or not 0 < len(tensors) <= MAX_TENSORS:
        raise InvalidRequest(f"{field}.tensors", "must be a non-empty list")
    entries = tuple(_entry(entry, nbytes, f"{field}.tensors[{i}]") for i, entry in enumerate(tensors))
    if transport == "shm":
        name = doc["shm_name"]
        if not isinstance(name, str) or not SHM_NAME.fullmatch(name):
            raise InvalidRequest(f"{field}.shm_name", f"must match {SHM_NAME.pattern}, not {_short(name)}")
        return BucketSpec(transport, nbytes, entries, field, shm_name=name)
    ipc = _cuda_ipc(doc["cuda_ipc"], nbytes, f"{field}.cuda_ipc")
    return BucketSpec(transport, nbytes, entries, field, cuda_ipc=ipc)


def _entry(doc: object, bucket_nbytes: int, field: str) -> TensorEntry:
    _keys(doc, {"name", "dtype", "shape", "offset"}, field)
    name = doc["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise InvalidRequest(f"{field}.name", f"a tensor name is a string of 1 to {MAX_NAME_CHARS} characters")
    dtype = parse_dtype_name(doc["dtype"], f"{field}.dtype")
    shape = parse_shape(doc["shape"], f"{field}.shape")
    offset = doc["offset"]
    if not _is_int(offset) or offset < 0 or offset % dtype.itemsize:
        raise InvalidRequest(f"{field}.offset", f"must be a non-negative multiple of {dtype.itemsize} (the item size)")
    entry = TensorEntry(name, dtype, shape, offset, field)
    if offset + entry.nbytes > bucket_nbytes:
        raise InvalidRequest(f"{field}.offset", f"bytes [{offset}, {offset + entry.nbytes}) lie outside the "
                                                f"bucket's {bucket_nbytes}")
    return entry


def _cuda_ipc(doc: object, nbytes: int, field: str) -> tuple:
    _keys(doc, set(_IPC_FIELDS), field)
    if not isinstance(doc["device_uuid"], str) or not DEVICE_UUID.fullmatch(doc["device_uuid"]):
        raise InvalidRequest(f"{field}.device_uuid", f"must match {DEVICE_UUID.pattern}")
    values = []
    for key in _IPC_FIELDS:
        value = doc[key]
        if key.endswith("handle"):
            try:
                value = base64.b64decode(value, validate=True) if isinstance(value, str) else None
            except binascii.Error:
                value = None
            if value is None or len(value) > MAX_HANDLE_BYTES or (key == "handle" and not value):
                raise InvalidRequest(f"{field}.{key}", f"must be base64 of at most {MAX_HANDLE_BYTES} bytes")
        elif key == "event_sync_required":
            if not isinstance(value, bool):
                raise InvalidRequest(f"{field}.{key}", "must be true or false")
        elif key != "device_uuid" and (not _is_int(value) or value < 0):
            raise InvalidRequest(f"{field}.{key}", "must be a non-negative integer")
        values.append(value)
    if doc["storage_size_bytes"] < nbytes:
        raise InvalidRequest(f"{field}.storage_size_bytes", f"the storage is smaller than the bucket ({nbytes} bytes)")
    return tuple(values)


def _keys(doc: object, expected: set[str], field: str) -> None:
    if not isinstance(doc, dict):
        raise InvalidRequest(field, "must be a JSON object")
    missing, unknown = expected - doc.keys(), doc.keys() - expected
    if missing:
        raise InvalidRequest(f"{field}.{sorted(missing)[0]}", "is missing")
    if unknown:
        raise InvalidRequest(f"{field}.{sorted(unknown)[0]}", "is not a field of this format")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- opening buffers: only after the whole request was checked ----------------------------------------

class OpenBucket:
    """A bucket's buffer mapped into this process, and views of its tensors; `close` unmaps it."""

    def __init__(self, spec: BucketSpec):
        self.spec = spec
        self.mapping: mmap.mmap | None = None
        self.buffer = self._open_shm(spec) if spec.transport == "shm" else self._open_cuda(spec)

    def _open_shm(self, spec: BucketSpec) -> torch.Tensor:
        """Map the segment read-only. Not through SharedMemory, whose resource tracker would claim the
        segment and unlink it when this process exits: it is the sender's to remove."""
        try:
            fd = _posixshmem.shm_open("/" + spec.shm_name, os.O_RDONLY, mode=0o600)
        except OSError as error:
            raise InvalidRequest(f"{spec.field}.shm_name", f"cannot open segment {spec.shm_name!r}: "
                                                           f"{error.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < spec.nbytes:
                raise InvalidRequest(f"{spec.field}.nbytes", f"segment {spec.shm_name!r} holds {size} bytes, "
                                                             f"not {spec.nbytes}")
            self.mapping = mmap.mmap(fd, spec.nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not writable": nothing writes to it
            return torch.frombuffer(self.mapping, dtype=torch.uint8, count=spec.nbytes)

    @staticmethod
    def _open_cuda(spec: BucketSpec) -> torch.Tensor:
        from tpfleet.devices import local_index_of

        uuid, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = spec.cuda_ipc
        try:
            index = local_index_of(uuid)
            torch.cuda._lazy_init()  # noqa: SLF001
            storage = torch.UntypedStorage._new_shared_cuda(index, handle, size, offset, ref_handle,  # noqa: SLF001
                                                            ref_offset, event_handle, event_sync)
        except Exception as error:  # noqa: BLE001 - a bad handle is the request's fault
            raise InvalidRequest(f"{spec.field}.cuda_ipc", f"cannot open the CUDA IPC handle: {error}") from None
        buffer = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}")
        return buffer.set_(storage, 0, (spec.nbytes,), (1,))

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(entry.name, self.buffer[entry.offset:entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape))
                for entry in self.spec.tensors]

    def close(self) -> None:
        self.buffer = None  # no view may outlive the mapping
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:  # a view is still referenced somewhere: unmapped when it goes
                pass
            self.mapping = None
