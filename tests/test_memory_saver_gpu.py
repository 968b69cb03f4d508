"""The memory saver on a GPU: release gives the memory back to the driver, resume maps it again at the
same addresses (bit-exact where backed up), captured CUDA graphs replay across it without re-capture,
repeated cycles do not leak, and saver memory is never IPC-exportable while cudaMalloc memory is. The
same again in a child process under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpfleet.memory import TAGS, MemorySaver, MemorySaverError, NullSaver, alloc_conf, ipc_exportable

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def fill_regions(saver) -> dict[str, torch.Tensor]:
    """A tensor per tag: 64 MiB of weights, 128 MiB of KV cache, 32 MiB of graph buffers."""
    tensors = {}
    with saver.region("weights"):
        tensors["weights"] = torch.randn(16 * MiB, device="cuda")
    with saver.region("kv_cache"):
        tensors["kv_cache"] = torch.full((64 * MiB,), 3.0, dtype=torch.bfloat16, device="cuda")
    with saver.region("cuda_graph"):
        tensors["cuda_graph"] = torch.arange(8 * MiB, dtype=torch.float32, device="cuda")
    return tensors


def check_release_and_resume(saver) -> None:
    tensors = fill_regions(saver)
    weights = tensors["weights"].cpu()
    pointers = {tag: t.data_ptr() for tag, t in tensors.items()}
    nbytes = sum(t.nbytes for t in tensors.values())
    held = saver.bytes()
    before = free_bytes()
    released = saver.release()
    after = free_bytes()
    assert list(released) == list(TAGS)
    assert released == held, (released, held)
    for tag, t in tensors.items():
        assert released[tag] >= t.nbytes, (tag, released[tag], t.nbytes)
    assert after - before >= 0.95 * nbytes, f"only {(after - before) / MiB:.0f} of {nbytes / MiB:.0f} MiB came back"
    assert saver.bytes() == dict.fromkeys(TAGS, 0)
    assert saver.release() == dict.fromkeys(TAGS, 0)  # released already: nothing more to do

    assert saver.resume() == released
    assert {tag: t.data_ptr() for tag, t in tensors.items()} == pointers
    assert torch.equal(tensors["weights"].cpu(), weights)  # cpu_backup: bit-exact
    for t in tensors.values():  # the other tags' memory is usable again (its contents are not kept)
        t.fill_(1)
    assert all(bool((t == 1).all()) for t in tensors.values())


def check_graph_replay(saver) -> None:
    with saver.region("weights"):
        w = torch.randn(1024, 1024, device="cuda") / 32
    with saver.region("cuda_graph"):
        x = torch.zeros(64, 1024, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles and workspaces
        torch.relu(x @ w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before = saver.bytes()["cuda_graph"]
    with saver.graph(graph):
        y = torch.relu(x @ w) * 2 + 1  # intermediates and the output live in the saver's graph pool
    assert saver.bytes()["cuda_graph"] > before, "the capture allocated nothing in the saver's graph pool"

    inp = torch.randn(64, 1024, device="cuda")

    def replay() -> torch.Tensor:
        x.copy_(inp)
        graph.replay()
        return y.clone()

    reference = replay()
    torch.testing.assert_close(reference, torch.relu(inp @ w) * 2 + 1, rtol=1e-4, atol=1e-4)
    out_ptr = y.data_ptr()
    for tags in (None, "cuda_graph"):
        saver.release(tags)
        saver.resume(tags)
        assert y.data_ptr() == out_ptr
        assert torch.equal(replay(), reference)  # the same graph, never re-captured


def check_ipc(saver) -> None:
    with saver.region("kv_cache"):
        mapped = torch.empty(4 * MiB, dtype=torch.uint8, device="cuda")
    assert not ipc_exportable(mapped)
    with alloc_conf.expandable_segments_off():  # cudaMalloc memory, whatever the process's settings
        plain = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    assert ipc_exportable(plain)
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return
    err, ptr = cudart.cudaMalloc(2 * MiB)  # allocated as the custom all-reduce allocates its buffers
    assert err == cudart.cudaError_t.cudaSuccess, err
    try:
        assert ipc_exportable(ptr)
    finally:
        cudart.cudaFree(ptr)


@pytest.fixture(scope="module")
def saver():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return MemorySaver("cuda", cpu_backup="weights")


def test_release_frees_memory_and_resume_keeps_addresses(saver):
    check_release_and_resume(saver)


def test_graph_replays_after_resume_without_recapture(saver):
    check_graph_replay(saver)


def test_twenty_cycles_keep_free_memory_steady(saver):
    with saver.region("kv_cache"):
        kv = torch.ones(256 * MiB, dtype=torch.uint8, device="cuda")
    released, resumed = [], []
    for _ in range(20):
        saver.release()
        released.append(free_bytes())
        saver.resume()
        resumed.append(free_bytes())
    for series in (released, resumed):
        drift = max(abs(f - series[0]) for f in series)
        assert drift <= 0.01 * series[0], f"free memory drifted by {drift / MiB:.0f} MiB over 20 cycles"
    assert released[0] - resumed[0] >= kv.nbytes


def test_saver_memory_is_never_ipc_exportable(saver):
    check_ipc(saver)
    if not alloc_conf.expandable(alloc_conf.current_settings()):
        assert ipc_exportable(torch.empty(64 * MiB, dtype=torch.uint8, device="cuda"))


def test_one_saver_per_device(saver):
    with pytest.raises(MemorySaverError, match="already has a memory saver"):
        MemorySaver("cuda")


def test_null_saver_captures_into_one_shared_pool():
    saver = NullSaver()
    x = torch.ones(16, device="cuda")
    graphs = [torch.cuda.CUDAGraph() for _ in range(2)]
    outs = []
    for g in graphs:
        with saver.graph(g):
            outs.append(x * 2)
    assert graphs[0].pool() == graphs[1].pool() == saver.graph_pool()
    x.fill_(3)
    graphs[1].replay()
    assert outs[1].tolist() == [6.0] * 16


def expandable_main() -> None:
    """Everything above, in a process whose allocator uses expandable segments."""
    assert alloc_conf.expandable(alloc_conf.current_settings())
    saver = MemorySaver("cuda", cpu_backup="weights")
    assert not ipc_exportable(torch.empty(64 * MiB, dtype=torch.uint8, device="cuda"))  # expandable: VMM
    check_release_and_resume(saver)
    assert alloc_conf.expandable(alloc_conf.current_settings()), "a region left expandable segments off"
    check_graph_replay(saver)
    check_ipc(saver)
    assert alloc_conf.expandable(alloc_conf.current_settings())
    print("expandable ok")


def test_the_same_under_expandable_segments():
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_memory_saver_gpu as t; t.expandable_main()"
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    env.pop("PYTORCH_ALLOC_CONF", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    assert "expandable ok" in run.stdout
