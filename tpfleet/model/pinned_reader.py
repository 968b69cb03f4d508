"""Checkpoint tensors for a GPU model, read in parallel through a few pinned host buffers.

Going through safetensors' memory map, every tensor reaches the GPU as a pageable copy, which the
driver stages through its own small pinned buffer, one tensor after another. Here a
safetensors file (an 8-byte header length, a JSON header, then the tensors' bytes back to back) is cut
into chunks of consecutive tensors, and reader threads `preadv` each chunk from the file straight
into a pinned buffer (the GIL is released while the kernel copies from the page cache), a few chunks
ahead of the consumer. The consumer gets tensors that view the buffer, so the weight loaders' copies
to the device are DMA from pinned memory. A buffer is refilled only once the consumer has asked for the chunk
after it: the loaders' copies from host memory are synchronous, so by then nothing reads it.
Tensors larger than a buffer, and dtypes torch cannot view bytes as, go through safetensors.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

BUFFER_BYTES = 128 << 20
NUM_BUFFERS = 4  # one being consumed, the others being filled

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype | None  # None: a dtype read through safetensors
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file
    end: int


@dataclass
class Chunk:
    """Consecutive tensors of one file read with one `preadv`; `entries` empty for a tensor read
    through safetensors instead (`alone`)."""
    begin: int = 0
    end: int = 0
    entries: list[TensorEntry] = field(default_factory=list)
    alone: TensorEntry | None = None


def read_header(path: Path) -> list[TensorEntry]:
    """The file's tensors in file order, with their absolute byte ranges, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise ValueError(f"{path}: header length {length} exceeds the file ({size} bytes)")
        header = json.loads(f.read(length))
    data_start = 8 + length
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (data_start + offset for offset in info["data_offsets"])
        shape = tuple(info["shape"])
        dtype = DTYPES.get(info["dtype"])
        if not data_start <= begin <= end <= size:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file's data")
        if dtype is not None and (end - begin) != dtype.itemsize * math.prod(shape):
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                             f"not {math.prod(shape)} x {info['dtype']}")
        entries.append(TensorEntry(name, dtype, shape, begin, end))
    return sorted(entries, key=lambda e: e.begin)


def plan_chunks(entries: list[TensorEntry], limit: int = BUFFER_BYTES) -> list[Chunk]:
    """Consecutive tensors up to `limit` bytes a chunk; a tensor starts a new chunk where its offset in
    the buffer would not be a multiple of its element size (a byte view can only be cast there)."""
    chunks: list[Chunk] = []
    current: Chunk | None = None
    for e in entries:
        if e.dtype is None or e.end - e.begin > limit:
            chunks.append(Chunk(alone=e))
            current = None
            continue
        if (current is None or e.end - current.begin > limit or (e.begin - current.begin) % e.dtype.itemsize
                or e.begin != current.end):
            current = Chunk(e.begin, e.begin)
            chunks.append(current)
        current.entries.append(e)
        current.end = e.end
    return chunks


def _read_into(fd: int, buffer: torch.Tensor, begin: int, end: int) -> None:
    view = memoryview(buffer.numpy())[: end - begin]
    done = 0
    while done < end - begin:
        n = os.preadv(fd, [view[done:]], begin + done)
        if n == 0:
            raise EOFError(f"the checkpoint file ended {end - begin - done} bytes early")
        done += n


def pinned_tensors(files: list[Path], buffer_bytes: int = BUFFER_BYTES,
                   pin: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every tensor of `files`, in file order. Each tensor is valid until
    the next one is asked for: the caller copies it somewhere (to the device) before that. `pin` False
    (tests without a GPU): the same path through pageable buffers."""
    buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(NUM_BUFFERS)]
    with ThreadPoolExecutor(NUM_BUFFERS - 1, thread_name_prefix="tpfleet-ckpt") as pool:
        for path in files:
            chunks = plan_chunks(read_header(path), buffer_bytes)
            fd = os.open(path, os.O_RDONLY)
            try:
                pending: dict[int, Future] = {}

                def submit(i: int) -> None:
                    if i < len(chunks) and chunks[i].alone is None:
                        c = chunks[i]
                        pending[i] = pool.submit(_read_into, fd, buffers[i % NUM_BUFFERS], c.begin, c.end)

                for i in range(NUM_BUFFERS - 1):
                    submit(i)
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for i, chunk in enumerate(chunks):
                        submit(i + NUM_BUFFERS - 1)  # into the buffer of chunk i - 1, which is done with
                        if chunk.alone is not None:
                            yield chunk.alone.name, handle.get_tensor(chunk.alone.name)
                            continue
                        pending.pop(i).result()
                        buffer = buffers[i % NUM_BUFFERS]
                        for e in chunk.entries:
                            raw = buffer[e.begin - chunk.begin: e.end - chunk.begin]
                            yield e.name, raw.view(e.dtype).view(e.shape)
            finally:
                for future in pending.values():
                    future.cancel()
                    if not future.cancelled():
                        future.exception()  # a read still running must end before the file closes
                os.close(fd)
