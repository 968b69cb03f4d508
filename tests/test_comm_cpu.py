"""Communicator logic that needs no GPU: device identity, dispatch tables, the JIT cache."""

from __future__ import annotations

import fcntl
import shutil
import threading
import time
from pathlib import Path

import pytest

from tpfleet.comm.dispatch import DispatchTable
from tpfleet.devices import DeviceError, PhysicalGPU, parse_visible_devices
from tpfleet.env import cache_root
from tpfleet.jit import (
    STATS,
    BuildSpec,
    JitUnavailable,
    build_library,
    find_nvcc,
    nvcc_version,
    track_triton,
)

GPUS = [PhysicalGPU(i, f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}") for i in range(8)]


@pytest.mark.parametrize("value,expected", [
    (None, [0, 1, 2, 3, 4, 5, 6, 7]),
    ("0,1", [0, 1]),
    ("1,0", [1, 0]),
    ("4,5,6,7", [4, 5, 6, 7]),
    (" 3 , 2 ", [3, 2]),
    ("2,9,3", [2]),  # the driver stops at the first entry naming no device
    ("", []),
    ("-1", []),
    (f"{GPUS[6].uuid},{GPUS[2].uuid}", [6, 2]),
    ("GPU-00000005,1", [5, 1]),  # unique UUID prefixes are accepted, mixed with indices
])
def test_visible_devices_forms(value, expected):
    assert [g.index for g in parse_visible_devices(value, GPUS)] == expected


def test_visible_devices_errors():
    with pytest.raises(DeviceError, match="twice"):
        parse_visible_devices("1,1", GPUS)
    with pytest.raises(DeviceError, match="ambiguous"):
        parse_visible_devices("GPU-0000000", GPUS)
    with pytest.raises(DeviceError, match="MIG"):
        parse_visible_devices("MIG-abc", GPUS)


def test_dispatch_table_picks_the_fastest_and_merges_runs():
    t = {"graph": {"nccl": {4096: 12.0, 65536: 20.0, 1 << 20: 30.0, 1 << 26: 250.0},
                   "custom_one_shot": {4096: 4.0, 65536: 6.0, 1 << 20: 40.0},
                   "symm_mem_two_shot": {4096: 7.0, 65536: 8.0, 1 << 20: 25.0, 1 << 26: 210.0}},
         "eager": {"nccl": {4096: 15.0}, "custom_one_shot": {4096: 9.0}}}
    table = DispatchTable.from_timings(t)
    assert table.rows["graph"] == [(65536, "custom_one_shot"), (1 << 26, "symm_mem_two_shot")]
    assert table.pick(100, "graph") == "custom_one_shot"
    assert table.pick(65537, "graph") == "symm_mem_two_shot"
    assert table.pick((1 << 26) + 1, "graph") == "nccl"  # past every measured size
    assert table.pick(4096, "eager") == "custom_one_shot"
    assert DispatchTable.from_json(table.to_json()).rows == table.rows


SOURCE = Path(__file__).parents[1] / "tpfleet" / "kernels" / "csrc" / "custom_all_reduce.cu"


def test_cache_key_follows_source_arch_compiler_and_flags(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("// v1\n")
    base = BuildSpec("k", src, "90")
    key = base.key("nvcc 13.0")
    assert key == BuildSpec("k", src, "90").key("nvcc 13.0")
    assert key != BuildSpec("k", src, "80").key("nvcc 13.0")
    assert key != base.key("nvcc 12.8")
    assert key != BuildSpec("k", src, "90", ("-O2",)).key("nvcc 13.0")
    src.write_text("// v2\n")
    assert key != base.key("nvcc 13.0")


@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (compiling needs no GPU)")
def test_jit_builds_once_then_hits_and_rebuilds_when_wiped(tmp_path, monkeypatch):
    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path))
    spec = BuildSpec("custom_all_reduce", SOURCE, "90")
    hits, misses = STATS.hits, STATS.misses
    lib = build_library(spec)
    assert lib.is_file() and STATS.misses == misses + 1
    assert build_library(spec) == lib and STATS.hits == hits + 1
    shutil.rmtree(lib.parent)
    assert build_library(spec).is_file() and STATS.misses == misses + 2


def test_waiting_for_a_peer_rank_s_build_counts_as_a_miss(tmp_path, monkeypatch):
    """Rank 0 blocked on the cache lock while rank 1 compiles is a cold start, not a cache hit."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Build cuda_13.0.r13.0/compiler'\n")  # asked only for its version
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(nvcc.parents[1]))
    monkeypatch.setenv("TPFLEET_CACHE_DIR", str(tmp_path / "cache"))
    spec = BuildSpec("k", SOURCE, "90")
    entry = cache_root() / "jit" / f"k-sm90-{spec.key(nvcc_version(str(nvcc)))}"
    entry.mkdir(parents=True)
    hits, misses = STATS.hits, STATS.misses
    built = {}
    with open(entry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the peer is compiling
        waiter = threading.Thread(target=lambda: built.update(lib=build_library(spec)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # blocked on the lock
        (entry / "k.so").write_bytes(b"the peer's build")
    waiter.join(10)
    assert built["lib"] == entry / "k.so"
    assert (STATS.hits, STATS.misses) == (hits, misses + 1)


def test_no_compiler_means_jit_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # a CUDA_HOME without nvcc
    with pytest.raises(JitUnavailable, match="nvcc not found"):
        build_library(BuildSpec("custom_all_reduce", SOURCE, "90"))


def test_triton_compilations_are_counted_as_jit_work():
    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs.compilation, "listener"):
        pytest.skip("this Triton has no compilation listener")
    assert track_triton() and track_triton()  # installing twice keeps one listener
    before = STATS.report().get("triton", {"hits": 0, "misses": 0, "seconds": 0.0})
    times = knobs.CompileTimes(ir_initialization=1000, lowering_stages=[("ttir", 250_000)], store_results=0)
    knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=times, cache_hit=False)
    knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=times, cache_hit=True)
    after = STATS.report()["triton"]
    assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"] + 1)
    assert after["seconds"] == pytest.approx(before["seconds"] + 2 * 0.251, abs=2e-3)
