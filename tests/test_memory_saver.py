"""The memory saver without a GPU: the tag rules every saver follows (NullSaver), the allocator-settings
switch, the build's failure modes, and the native allocator's release/resume bookkeeping run against a
stand-in CUDA driver whose "device memory" is host memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tpfleet import jit
from tpfleet.memory import TAGS, MemorySaverError, NullSaver, alloc_conf, make_saver, native

# --- tag semantics ---------------------------------------------------------------------------------


def test_null_saver_reports_every_tag_in_order():
    saver = make_saver("cpu", enable=True)
    assert isinstance(saver, NullSaver) and not saver.enabled
    assert list(saver.release()) == list(TAGS)
    assert saver.release() == dict.fromkeys(TAGS, 0)
    assert saver.bytes() == dict.fromkeys(TAGS, 0)
    assert saver.released == frozenset(TAGS)


def test_tags_select_none_one_or_several():
    saver = NullSaver()
    assert saver.release("kv_cache") == {"kv_cache": 0}
    assert saver.released == {"kv_cache"}
    assert saver.release(["cuda_graph", "weights"]) == {"weights": 0, "cuda_graph": 0}  # TAGS order
    assert saver.resume(None) == dict.fromkeys(TAGS, 0)
    assert saver.released == frozenset()


@pytest.mark.parametrize("call", ["release", "resume", "region", "graph_pool"])
def test_unknown_tag_is_named_and_changes_nothing(call):
    saver = NullSaver()
    with pytest.raises(ValueError, match="'kv'") as err:
        if call == "region":
            with saver.region("kv"):
                pass
        elif call == "graph_pool":
            saver.graph_pool("kv")
        else:
            getattr(saver, call)(["weights", "kv"])
    assert "weights, kv_cache, cuda_graph" in str(err.value)
    assert saver.released == frozenset()


def test_release_twice_and_resume_without_release_are_no_ops():
    saver = NullSaver()
    assert saver.resume("weights") == {"weights": 0}
    assert saver.released == frozenset()
    saver.release("weights")
    assert saver.release("weights") == {"weights": 0}
    assert saver.released == {"weights"}
    saver.resume("weights")
    assert saver.resume("weights") == {"weights": 0}
    assert saver.released == frozenset()


def test_released_tag_refuses_allocations_until_resumed():
    saver = NullSaver()
    saver.release("kv_cache")
    with pytest.raises(MemorySaverError, match="resume it first"):
        with saver.region("kv_cache"):
            pass
    with pytest.raises(MemorySaverError, match="resume it first"):
        saver.graph_pool("kv_cache")
    with saver.region("weights"):  # other tags are unaffected
        pass
    saver.resume()
    with saver.region("kv_cache"):
        pass


def test_regions_do_not_nest_and_block_release():
    saver = NullSaver()
    with saver.region("weights"):
        for attempt in (lambda: saver.region("kv_cache").__enter__(), saver.release, saver.resume,
                        lambda: saver.graph_pool()):
            with pytest.raises(MemorySaverError, match=r"inside region\('weights'\)"):
                attempt()
    with pytest.raises(KeyError):  # an error inside a region closes it
        with saver.region("weights"):
            raise KeyError
    assert saver.release("weights") == {"weights": 0}


def test_memory_saver_needs_a_cuda_device():
    with pytest.raises(MemorySaverError, match="not a CUDA device"):
        native.cuda_device("cpu")


# --- expandable segments ---------------------------------------------------------------------------


def test_expandable_parsing():
    assert alloc_conf.expandable("expandable_segments:True")
    assert alloc_conf.expandable("max_split_size_mb:128, expandable_segments:True")
    assert not alloc_conf.expandable("expandable_segments:True,expandable_segments:False")
    assert not alloc_conf.expandable("")
    settings = "roundup_power2_divisions:[256:1,512:2,>:4],expandable_segments:True,max_split_size_mb:64"
    off = alloc_conf.without_expandable(settings)
    assert off == "roundup_power2_divisions:[256:1,512:2,>:4],expandable_segments:False,max_split_size_mb:64"


def test_expandable_segments_off_restores_the_settings(monkeypatch):
    state = {"settings": "max_split_size_mb:64,expandable_segments:True"}
    applied = []
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: state["settings"], raising=False)

    def apply(s):
        applied.append(s)
        state["settings"] = s

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", apply, raising=False)
    with pytest.raises(RuntimeError):
        with alloc_conf.expandable_segments_off():
            assert not alloc_conf.expandable(state["settings"])
            raise RuntimeError
    assert applied == ["max_split_size_mb:64,expandable_segments:False",
                       "max_split_size_mb:64,expandable_segments:True"]
    state["settings"] = "max_split_size_mb:64"
    applied.clear()
    with alloc_conf.expandable_segments_off():
        pass
    assert applied == []  # nothing to switch off: the settings are left alone


# --- building the library ----------------------------------------------------------------------------


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_build_without_nvcc_is_jit_unavailable(fresh_build, monkeypatch):
    monkeypatch.setattr(jit, "find_nvcc", lambda: None)
    with pytest.raises(jit.JitUnavailable, match="memory saver needs its CUDA allocator.*nvcc not found"):
        native.load_library(torch.device("cuda", 0))


def test_build_without_cuda_headers_is_jit_unavailable(fresh_build, monkeypatch, tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'release 13.0'; exit 0; fi\n"
                    "echo 'vmm_allocator.cpp:18:10: fatal error: cuda.h: No such file or directory' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(home))
    with pytest.raises(jit.JitUnavailable, match="cuda.h: No such file"):
        native.load_library(torch.device("cuda", 0))


# --- the native allocator against a stand-in driver ------------------------------------------------

# Host memory plays device memory: an address range is an inaccessible anonymous mapping, a physical
# allocation a memfd, mapping it an mmap of the memfd over the range (inaccessible until
# cuMemSetAccess), unmapping it an inaccessible mapping again. Only what vmm_allocator.cpp calls.
MOCK_DRIVER = r"""
#define _GNU_SOURCE
#include <cuda.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define OK CUDA_SUCCESS
#define BAD CUDA_ERROR_INVALID_VALUE
#define OOM CUDA_ERROR_OUT_OF_MEMORY
#define MAX_RANGES 4096

int mock_creates_left = -1;  /* cuMemCreate fails with OUT_OF_MEMORY once this reaches 0; -1: never */
long long mock_physical = 0; /* bytes of live physical allocations */
static __thread CUcontext current;
static __thread CUstreamCaptureMode capture_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
static struct { uintptr_t base; size_t size; } ranges[MAX_RANGES];

CUresult cuInit(unsigned int flags) { return OK; }
CUresult cuGetErrorName(CUresult r, const char **s) {
  *s = r == OOM ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_OTHER";
  return OK;
}
CUresult cuGetErrorString(CUresult r, const char **s) { *s = "mock driver"; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) { *d = ordinal; return OK; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { *c = (CUcontext)(uintptr_t)(0x1000 + d); return OK; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = current; return OK; }
CUresult cuCtxSetCurrent(CUcontext c) { current = c; return OK; }
CUresult cuCtxSynchronize(void) { return OK; }
CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *p, CUmemAllocationGranularity_flags o) {
  *g = 2u << 20;
  return p->requestedHandleTypes == CU_MEM_HANDLE_TYPE_NONE ? OK : BAD;
}
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long f) {
  void *m = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return OOM;
  for (int i = 0; i < MAX_RANGES; i++) {
    if (!ranges[i].base) { ranges[i].base = (uintptr_t)m; ranges[i].size = size; break; }
  }
  *p = (CUdeviceptr)m;
  return OK;
}
CUresult cuMemAddressFree(CUdeviceptr p, size_t size) {
  for (int i = 0; i < MAX_RANGES; i++) if (ranges[i].base == p) ranges[i].base = 0;
  return munmap((void *)p, size) ? BAD : OK;
}
CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *p,
                     unsigned long long f) {
  if (mock_creates_left == 0) return OOM;
  if (mock_creates_left > 0) mock_creates_left--;
  if (p->location.type != CU_MEM_LOCATION_TYPE_DEVICE || p->type != CU_MEM_ALLOCATION_TYPE_PINNED) return BAD;
  int fd = memfd_create("mock-device-memory", 0);
  if (fd < 0 || ftruncate(fd, size)) return OOM;
  mock_physical += size;
  *h = (CUmemGenericAllocationHandle)fd;
  return OK;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
  struct stat st;
  if (fstat((int)h, &st)) return BAD;
  mock_physical -= st.st_size;
  close((int)h);
  return OK;
}
CUresult cuMemMap(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h, unsigned long long f) {
  return mmap((void *)p, size, PROT_NONE, MAP_SHARED | MAP_FIXED, (int)h, offset) == MAP_FAILED ? BAD : OK;
}
CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t count) {
  if (count != 1 || d->flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE) return BAD;
  return mprotect((void *)p, size, PROT_READ | PROT_WRITE) ? BAD : OK;
}
CUresult cuMemUnmap(CUdeviceptr p, size_t size) {
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE;
  return mmap((void *)p, size, PROT_NONE, flags, -1, 0) == MAP_FAILED ? BAD : OK;
}
CUresult cuMemHostAlloc(void **pp, size_t size, unsigned int flags) { *pp = malloc(size); return *pp ? OK : OOM; }
CUresult cuMemFreeHost(void *p) { free(p); return OK; }
CUresult cuMemcpyDtoHAsync(void *dst, CUdeviceptr src, size_t n, CUstream s) { memcpy(dst, (void *)src, n); return OK; }
CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
  memcpy((void *)dst, src, n);
  return OK;
}
CUresult cuStreamSynchronize(CUstream s) { return OK; }
CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *st) { *st = CU_STREAM_CAPTURE_STATUS_NONE; return OK; }
CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *m) {
  CUstreamCaptureMode old = capture_mode;
  capture_mode = *m;
  *m = old;
  return OK;
}
CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr p) {
  for (int i = 0; i < MAX_RANGES; i++) {
    if (ranges[i].base && p >= ranges[i].base && p < ranges[i].base + ranges[i].size) return BAD;
  }
  return OK;
}
"""

# Runs in a child: the stand-in driver, loaded first under its soname, is the libcuda.so.1 that the
# allocator's dlopen finds.
MOCK_SCENARIO = r"""
import ctypes, sys
from pathlib import Path
from tpfleet.memory.native import VmmLibrary, alloc_symbol, FREE_SYMBOL
from tpfleet.memory.tags import MemorySaverError

mock = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
vmm = VmmLibrary(Path(sys.argv[2]))
raw = ctypes.CDLL(sys.argv[2])
MiB = 1 << 20
physical = ctypes.c_longlong.in_dll(mock, "mock_physical")
creates_left = ctypes.c_int.in_dll(mock, "mock_creates_left")

def alloc(slot, size, device=0):
    fn = getattr(raw, alloc_symbol(slot))
    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return fn(size, device, None)

free = getattr(raw, FREE_SYMBOL)
free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]

a, b = alloc(0, 3 * MiB), alloc(0, 1 * MiB)
other_slot, other_device = alloc(1, 2 * MiB), alloc(0, 2 * MiB, device=1)
assert a % (2 * MiB) == 0 and b % (2 * MiB) == 0
assert vmm.bytes(0, 0, mapped_only=True) == 6 * MiB, vmm.bytes(0, 0, True)
assert physical.value == 10 * MiB
pattern_a, pattern_b = bytes(range(256)) * (3 * MiB // 256), b"\x5a" * MiB
ctypes.memmove(a, pattern_a, len(pattern_a))
ctypes.memmove(b, pattern_b, len(pattern_b))

# release with a backup: the pages go, the range stays; resume maps new pages there and restores them
assert vmm.release(0, 0, backup=True, stream=0) == 6 * MiB
assert vmm.bytes(0, 0, True) == 0 and vmm.bytes(0, 0, False) == 6 * MiB
assert physical.value == 4 * MiB  # the other slot and the other device keep theirs
assert vmm.release(0, 0, backup=True, stream=0) == 0  # nothing mapped: nothing to do
assert vmm.resume(0, 0, stream=0) == 6 * MiB
assert ctypes.string_at(a, len(pattern_a)) == pattern_a and ctypes.string_at(b, MiB) == pattern_b
assert vmm.resume(0, 0, stream=0) == 0

# without a backup the contents are not restored, even though an old host copy exists
vmm.release(0, 0, backup=False, stream=0)
vmm.resume(0, 0, stream=0)
assert ctypes.string_at(b, MiB) == b"\0" * MiB

# a resume that fails half-way says why, and a second one maps the rest and restores every backup
ctypes.memmove(b, pattern_b, len(pattern_b))
ctypes.memmove(a, pattern_a, len(pattern_a))
vmm.release(0, 0, backup=True, stream=0)
creates_left.value = 1
try:
    vmm.resume(0, 0, stream=0)
    raise AssertionError("resume should have failed")
except MemorySaverError as e:
    assert "cuMemCreate(" in str(e) and "CUDA_ERROR_OUT_OF_MEMORY" in str(e), e
creates_left.value = -1
assert vmm.resume(0, 0, stream=0) in (2 * MiB, 4 * MiB)
assert ctypes.string_at(a, len(pattern_a)) == pattern_a and ctypes.string_at(b, MiB) == pattern_b

# saver memory is not IPC-exportable; other memory is
assert not vmm.ipc_exportable(0, a) and not vmm.ipc_exportable(0, b + 4096)
host = ctypes.create_string_buffer(64)
assert vmm.ipc_exportable(0, ctypes.addressof(host))

# free gives back the pages and the range, released or not; unknown pointers are refused loudly
vmm.release(0, 0, backup=True, stream=0)
free(a, 3 * MiB, 0, None)
free(b, MiB, 0, None)
assert vmm.bytes(0, 0, False) == 0 and physical.value == 4 * MiB
free(other_slot, 2 * MiB, 0, None)
free(other_device, 2 * MiB, 1, None)
assert physical.value == 0
free(12345, 0, 0, None)
print("scenario ok")
"""


@pytest.mark.skipif(jit.find_nvcc() is None, reason="needs nvcc and the CUDA headers")
def test_native_allocator_against_a_stand_in_driver(tmp_path, monkeypatch):
    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path / "cache"))
    lib = jit.build_library(jit.BuildSpec("vmm_allocator", native.SOURCE, "90", ("-O3", "-std=c++17")))
    source = tmp_path / "mock_driver.c"
    source.write_text(MOCK_DRIVER)
    mock = tmp_path / "libcuda.so.1"
    build = subprocess.run([jit.find_nvcc(), "-shared", "-Xcompiler", "-fPIC", "-cudart", "none", "-Xlinker",
                            "-soname=libcuda.so.1", "-o", str(mock), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(MOCK_SCENARIO), str(mock), str(lib)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "scenario ok" in run.stdout
    assert "free of 0x3039, which it did not allocate" in run.stderr
