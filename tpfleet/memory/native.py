"""The memory saver's native allocator (csrc/vmm_allocator.cpp): built by tpfleet's JIT, called through
ctypes, and handed to PyTorch as a pluggable allocator."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tpfleet.jit import BuildSpec, JitUnavailable, build_library
from tpfleet.memory.tags import MemorySaverError

SOURCE = Path(__file__).parent / "csrc" / "vmm_allocator.cpp"
FREE_SYMBOL = "tpf_vmm_free"
_libs: dict[str, VmmLibrary] = {}
_allocators: dict[tuple[Path, int], torch.cuda.memory.CUDAPluggableAllocator] = {}


def alloc_symbol(slot: int) -> str:
    """The allocation entry point of a tag slot: every allocation made through it carries that slot."""
    return f"tpf_vmm_alloc_{slot}"


def pluggable_allocator(lib: VmmLibrary, slot: int) -> torch.cuda.memory.CUDAPluggableAllocator:
    """PyTorch's allocator object for a slot, kept for the life of the process: a MemPool holds only a
    raw pointer to it, and PyTorch frees a segment still in use when its pool goes through it later."""
    key = (lib.path, slot)
    if key not in _allocators:
        _allocators[key] = torch.cuda.memory.CUDAPluggableAllocator(str(lib.path), alloc_symbol(slot), FREE_SYMBOL)
    return _allocators[key]


class VmmLibrary:
    """The library's control functions, typed; a failure raises MemorySaverError with its message."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        i, ull, vp = ctypes.c_int, ctypes.c_ulonglong, ctypes.c_void_p
        lib.tpf_vmm_init.restype = i
        lib.tpf_vmm_max_slots.restype = i
        lib.tpf_vmm_last_error.restype = ctypes.c_char_p
        lib.tpf_vmm_release.argtypes = [i, i, i, vp, ctypes.POINTER(ull)]
        lib.tpf_vmm_resume.argtypes = [i, i, vp, ctypes.POINTER(ull)]
        lib.tpf_vmm_bytes.argtypes = [i, i, i]
        lib.tpf_vmm_bytes.restype = ull
        lib.tpf_vmm_ipc_exportable.argtypes = [i, ull, ctypes.POINTER(i)]
        self._lib = lib
        self._check(lib.tpf_vmm_init(), "loading the CUDA driver API")
        self.max_slots = lib.tpf_vmm_max_slots()

    def last_error(self) -> str:
        return self._lib.tpf_vmm_last_error().decode(errors="replace")

    def _check(self, code: int, doing: str) -> None:
        if code:
            raise MemorySaverError(f"memory saver: {doing}: {self.last_error()}")

    def release(self, device: int, slot: int, backup: bool, stream: int) -> int:
        freed = ctypes.c_ulonglong()
        code = self._lib.tpf_vmm_release(device, slot, int(backup), ctypes.c_void_p(stream), ctypes.byref(freed))
        self._check(code, f"releasing slot {slot} on device {device}")
        return freed.value

    def resume(self, device: int, slot: int, stream: int) -> int:
        mapped = ctypes.c_ulonglong()
        code = self._lib.tpf_vmm_resume(device, slot, ctypes.c_void_p(stream), ctypes.byref(mapped))
        self._check(code, f"resuming slot {slot} on device {device}")
        return mapped.value

    def bytes(self, device: int, slot: int, mapped_only: bool) -> int:
        return self._lib.tpf_vmm_bytes(device, slot, int(mapped_only))

    def ipc_exportable(self, device: int, ptr: int) -> bool:
        out = ctypes.c_int()
        code = self._lib.tpf_vmm_ipc_exportable(device, ptr, ctypes.byref(out))
        self._check(code, f"asking for an IPC handle of {ptr:#x}")
        return bool(out.value)


def cuda_device(device: torch.device | int | str | None) -> torch.device:
    """`device` as a CUDA device with an index (the current device where none is given)."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if device.type != "cuda":
        raise MemorySaverError(f"the memory saver maps CUDA memory; {device} is not a CUDA device")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def load_library(device: torch.device) -> VmmLibrary:
    """The allocator library, built on first use (cached on disk like tpfleet's other CUDA libraries).
    Raises JitUnavailable, saying why, where no toolchain or no CUDA headers can build it."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"
    if arch not in _libs:
        try:
            path = build_library(BuildSpec("vmm_allocator", SOURCE, arch, ("-O3", "-std=c++17")))
        except JitUnavailable as e:
            raise JitUnavailable(f"the memory saver needs its CUDA allocator, which cannot be built: {e}") from e
        _libs[arch] = VmmLibrary(path)
    return _libs[arch]


def ipc_exportable(tensor_or_ptr: torch.Tensor | int, device: torch.device | int | None = None) -> bool:
    """Whether CUDA IPC can export this memory (cudaIpcGetMemHandle succeeds): true of plain cudaMalloc
    memory, such as the custom all-reduce's buffers; false ("invalid argument") of VMM-mapped memory,
    the saver's and expandable segments' alike."""
    if isinstance(tensor_or_ptr, torch.Tensor):
        ptr, device = tensor_or_ptr.data_ptr(), tensor_or_ptr.device
    else:
        ptr = tensor_or_ptr
    device = cuda_device(device)
    return load_library(device).ipc_exportable(device.index, ptr)
