"""The communicator on real GPUs (2 and 4 where present): exactness, graphs, remapping, failures."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_GPUS
from multiproc import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 GPUs")]
WORLDS = [w for w in (2, 4) if w <= NUM_GPUS]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# elements: one pack, odd pack counts, the one-shot/two-shot boundary region, and the two-shot limit
SIZES = (8, 24, 1000 * 8, 4096, 65536, 3 * 65536 + 8, 524288, 4 << 20)


def _car(**kw):
    import torch.distributed as dist

    from tpfleet.comm.custom_ar import CustomAllReduce

    return CustomAllReduce(dist.group.WORLD, torch.device("cuda", torch.cuda.current_device()), **kw)


def _ints(numel, dtype, gen):
    return torch.randint(-8, 8, (numel,), generator=gen, device="cuda").to(dtype)


def _exact_sum(x):
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.stack(parts).double().sum(0).to(x.dtype)


def _exactness(rank, world):
    import torch.distributed as dist

    car = _car()
    gen = torch.Generator(device="cuda").manual_seed(rank)
    failures = []
    for dtype in DTYPES:
        for numel in SIZES:
            nbytes = numel * dtype.itemsize
            for two_shot in (False, True):
                if nbytes > (car.max_two_shot_bytes if two_shot else car.max_one_shot_bytes):
                    continue
                x = _ints(numel, dtype, gen)
                got = car.all_reduce(x, two_shot=two_shot)
                if not torch.equal(got, _exact_sum(x)):
                    failures.append((str(dtype), numel, two_shot))
                # Real-valued data: every rank must hold bitwise the same result.
                y = torch.randn(numel, generator=gen, device="cuda").to(dtype)
                out = car.all_reduce(y, two_shot=two_shot)
                ref = torch.stack([t for t in _gather(y)]).double().sum(0)
                if (out.double() - ref).abs().max() > 1e-2 * ref.abs().max() + 1e-2:
                    failures.append(("real", str(dtype), numel, two_shot))
                outs = _gather(out)
                if not all(torch.equal(outs[0], o) for o in outs):
                    failures.append(("ranks differ", str(dtype), numel, two_shot))
    car.close()
    dist.barrier()
    return failures


def _gather(x):
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


@pytest.mark.parametrize("world", WORLDS)
def test_exact_against_float64_at_many_sizes_and_dtypes(world):
    assert run_ranks(_exactness, world) == [[]] * world


def _graphs(rank, world):
    """Fresh inputs at every replay; many all-reduces in one graph; two graphs sharing the
    communicator, replayed interleaved with eager calls of other sizes."""
    car = _car()
    gen = torch.Generator(device="cuda").manual_seed(100 + rank)
    sizes_a = [4096, 8, 65536, 4096, 3 * 65536 + 8] * 4  # 20 calls, mixed one- and two-shot
    ins_a = [torch.zeros(n, dtype=torch.bfloat16, device="cuda") for n in sizes_a]
    ins_b = [torch.zeros(524288, dtype=torch.bfloat16, device="cuda")]  # one two-shot call: odd count
    torch.cuda.synchronize()
    ga, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(ga):
        outs_a = [car.all_reduce(x) for x in ins_a]
    with torch.cuda.graph(gb):
        outs_b = [car.all_reduce(x, two_shot=True) for x in ins_b]
    failures = []
    for step in range(6):
        for which, ins, outs, g in (("a", ins_a, outs_a, ga), ("b", ins_b, outs_b, gb))[:: 1 if step % 2 else -1]:
            for x in ins:
                x.copy_(_ints(x.numel(), x.dtype, gen))
            expected = [_exact_sum(x) for x in ins]
            g.replay()
            eager_in = _ints(24 + 8 * step, torch.float32, gen)
            eager_out = car.all_reduce(eager_in)
            torch.cuda.synchronize()
            if not torch.equal(eager_out, _exact_sum(eager_in)):
                failures.append(("eager", step))
            failures += [(which, step, i) for i, (o, e) in enumerate(zip(outs, expected)) if not torch.equal(o, e)]
    car.check()
    car.close()
    return failures


@pytest.mark.parametrize("world", WORLDS)
def test_cuda_graphs_replay_fresh_inputs_and_interleave_with_eager(world):
    assert run_ranks(_graphs, world) == [[]] * world


def _uuids_and_sum(rank, world):
    from tpfleet.devices import local_uuid

    car = _car()
    x = _ints(4096, torch.bfloat16, torch.Generator(device="cuda").manual_seed(rank))
    ok = torch.equal(car.all_reduce(x), _exact_sum(x))
    uuid = car.uuid
    car.close()
    return uuid, local_uuid(torch.cuda.current_device()), ok


def test_remapped_visible_devices_resolve_to_the_right_uuids():

    from tpfleet.devices import local_uuid

    physical = [local_uuid(i) for i in range(2)]
    out = run_ranks(_uuids_and_sum, 2, env={"CUDA_VISIBLE_DEVICES": "1,0"})
    assert [o[0] for o in out] == [physical[1], physical[0]]
    assert all(o[0] == o[1] and o[2] for o in out)


def _graph_with_expandable_segments(rank, world):
    import os

    assert "expandable_segments:True" in os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    car = _car()
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.zeros(65536, dtype=torch.bfloat16, device="cuda")  # from an expandable (VMM) segment
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = car.all_reduce(x)
    fails = 0
    for _ in range(3):
        x.copy_(_ints(x.numel(), x.dtype, gen))
        expected = _exact_sum(x)
        g.replay()
        torch.cuda.synchronize()
        fails += not torch.equal(y, expected)
    car.close()
    return fails


def test_graphs_work_with_expandable_segments():
    assert run_ranks(_graph_with_expandable_segments, 2,
                     env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}) == [0, 0]


def _timeout_on_rank0(rank, provoke, check, close):
    """Rank 0 calls `provoke` alone, as if rank 1 were dead, then `check`: the CommTimeout's message and
    the seconds it took, or "no error" (always, on rank 1). `close` runs on every rank at the end."""
    import time

    import torch.distributed as dist

    from tpfleet.comm.custom_ar import CommTimeout

    dist.barrier()
    result = "no error"
    if rank == 0:
        t = time.monotonic()
        provoke()
        torch.cuda.synchronize()
        try:
            check()
        except CommTimeout as e:
            result = (str(e), time.monotonic() - t)
    dist.barrier()
    close()
    return result


def _timeout(rank, world):
    car = _car(timeout_s=1.0)
    return _timeout_on_rank0(rank, lambda: car.all_reduce(torch.ones(4096, dtype=torch.bfloat16, device="cuda")),
                             car.check, car.close)


def test_a_missing_peer_raises_a_timeout_naming_it_instead_of_hanging():
    out = run_ranks(_timeout, 2, timeout=60)
    message, seconds = out[0]
    assert "rank 0" in message and "rank 1" in message and "GPU-" in message
    assert seconds < 10


def _wrong_device(rank, world):
    from tpfleet.devices import DeviceError

    car = _car()
    other = (torch.cuda.current_device() + 1) % torch.cuda.device_count()
    x = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
    try:
        with torch.cuda.device(other):
            car.all_reduce(x)
        msg = "no error"
    except DeviceError as e:
        msg = str(e)
    car.close()
    return msg


def test_calling_from_another_current_device_is_refused_naming_both():
    for msg in run_ranks(_wrong_device, 2):
        assert msg.count("GPU-") >= 2 and "created for" in msg


def _same_gpu(rank, world):
    import torch.distributed as dist

    from tpfleet.comm.custom_ar import CustomAllReduce
    from tpfleet.devices import DeviceError

    try:
        CustomAllReduce(dist.group.WORLD, torch.device("cuda", 0))
        return "no error"
    except DeviceError as e:
        return str(e)


def test_two_ranks_on_one_gpu_are_refused_on_every_rank():
    import torch.distributed as dist  # noqa: F401

    msgs = run_ranks(_same_gpu, 2, timeout=60)
    assert all("share a GPU" in m for m in msgs)


def _communicator(rank, world):
    """The dispatcher end to end: every backend it kept gives exact sums, eager and in a graph,
    with inputs written where input_buffer says."""
    import torch.distributed as dist

    from tpfleet.comm.communicator import Communicator
    from tpfleet.comm.dispatch import DispatchTable

    gen = torch.Generator(device="cuda").manual_seed(rank)
    device = torch.device("cuda", torch.cuda.current_device())
    comm = Communicator(dist.group.WORLD, device, torch.bfloat16)
    picked, failures = set(), []
    for name in list(comm.backends):
        # Force each backend in turn through a one-row table.
        comm.table = DispatchTable({"eager": [(1 << 30, name)], "graph": [(1 << 30, name)]})
        for numel in (4096, 65536, 1 << 20):
            buf = comm.input_buffer((numel,), torch.bfloat16)
            x = buf if buf is not None else torch.empty(numel, dtype=torch.bfloat16, device="cuda")
            x.copy_(_ints(numel, torch.bfloat16, gen))
            expected = _exact_sum(x.clone())
            b = comm.pick(x)
            picked.add(b.name)
            if not torch.equal(comm.all_reduce(x), expected):
                failures.append((name, numel, "eager"))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = comm.all_reduce(x)
            x.copy_(_ints(numel, torch.bfloat16, gen))
            expected = _exact_sum(x.clone())
            g.replay()
            torch.cuda.synchronize()
            if not torch.equal(y, expected):
                failures.append((name, numel, "graph"))
    comm.close()
    return sorted(picked), comm.disabled, failures


@pytest.mark.parametrize("world", WORLDS)
def test_communicator_backends_all_exact_eager_and_graph(world):
    for picked, disabled, failures in run_ranks(_communicator, world):
        assert failures == []
        assert {"nccl", "custom_one_shot", "custom_two_shot"} <= set(picked), disabled


def _uneven_symm_history(rank, world):
    """Rank 0's process has (by its count) made one more symmetric-memory rendezvous than its peers,
    as the driver of a second engine in one process has: torch would key the next one differently
    per rank and stall."""
    import torch.distributed as dist

    from tpfleet.comm.backends import SymmMemBuffer
    from tpfleet.comm.communicator import Communicator

    SymmMemBuffer.rendezvous_made += rank == 0
    comm = Communicator(dist.group.WORLD, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    x = _ints(65536, torch.bfloat16, torch.Generator(device="cuda").manual_seed(rank))
    ok = torch.equal(comm.all_reduce(x.clone()), _exact_sum(x))
    comm.close()
    return comm.disabled.get("symm_mem", ""), "symm_mem_one_shot" in comm.backends, ok


def test_uneven_symmetric_memory_history_skips_it_instead_of_stalling():
    for reason, kept, ok in run_ranks(_uneven_symm_history, 2, timeout=90):
        assert "symmetric-memory rendezvous" in reason and not kept and ok


def _fused_chain(rank, world):
    """Batch-1 layer chains with the all-reduces fused into the GEMVs, over real IPC, eagerly and
    replayed from a CUDA graph (with PDL on Hopper): bitwise the unfused path (GEMV, custom
    all-reduce, norm-GEMV). Returns the number of steps checked."""
    from tpfleet.comm.fused_ar import FusedAllReduce
    from tpfleet.kernels import gemv

    hidden, inter, layers = 4096, 12288 // world, 4
    car = _car()
    fused = FusedAllReduce.over_ipc(car, 2 * layers, hidden)
    exchange = fused.exchange
    g = torch.Generator("cuda").manual_seed(rank)  # each rank its own shards

    def rnd(*s, scale=0.05):
        return (scale * torch.randn(*s, generator=g, device="cuda")).to(torch.bfloat16)

    nw = 1 + rnd(hidden, scale=0.1)
    ws = [(rnd(3072, hidden), rnd(hidden, 4096 // world), rnd(2 * inter, hidden), rnd(hidden, inter))
          for _ in range(layers)]
    x0 = torch.full((1, hidden), 0.5, dtype=torch.bfloat16, device="cuda")

    def run(use_fused: bool):
        x, res = x0, torch.zeros_like(x0)
        for i, (w_qkv, w_o, w_gate_up, w_down) in enumerate(ws):
            qkv, res = gemv.norm_linear(x, res, nw, 1e-6, w_qkv)
            o = qkv[:, : w_o.shape[1]].contiguous()  # stands in for attention: this rank's heads
            if use_fused:
                attn_out = gemv.linear(o, w_o, all_reduce=(exchange, 2 * i))
                gate_up, res = gemv.norm_linear(attn_out, res, nw, 1e-6, w_gate_up)
                x = gemv.silu_mul_linear(gate_up, w_down, all_reduce=(exchange, 2 * i + 1))
            else:
                gate_up, res = gemv.norm_linear(car.all_reduce(gemv.linear(o, w_o)), res, nw, 1e-6, w_gate_up)
                x = car.all_reduce(gemv.silu_mul_linear(gate_up, w_down))
        final, _ = gemv.norm_linear(x, res, nw, 1e-6, ws[0][0])
        return final, res

    def fused_step():
        fused.begin_step()
        return run(True)

    expected = run(False)
    checked = 0
    for _ in range(3):
        got = fused_step()
        torch.cuda.synchronize()
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), f"rank {rank}, eager"
        checked += 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_step()
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1]), f"rank {rank}, graph"
        checked += 1
    fused.check()
    car.close()
    return checked


@pytest.mark.parametrize("world", WORLDS)
def test_fused_all_reduce_chain_is_bitwise_the_unfused_path(world):
    assert run_ranks(_fused_chain, world, timeout=240) == [8] * world


def _fused_timeout(rank, world):
    from tpfleet.comm.fused_ar import FusedAllReduce
    from tpfleet.kernels import gemv
    from tpfleet.model.ar_sites import site_name

    car = _car()
    fused = FusedAllReduce.over_ipc(car, 4, 4096, timeout_s=3.0, site_name=site_name)

    def step_without_peer():
        """Four sites, the first being site 2: only the first may wait out the timeout."""
        fused.begin_step()
        x = torch.ones(1, 2048, dtype=torch.bfloat16, device="cuda")
        for site in (2, 0, 1, 3):
            gemv.linear(x, torch.ones(4096, 2048, dtype=torch.bfloat16, device="cuda"),
                        all_reduce=(fused.exchange, site))

    return _timeout_on_rank0(rank, step_without_peer, fused.check, car.close)


def test_fused_all_reduce_with_a_missing_peer_raises_a_timeout_instead_of_hanging():
    out = run_ranks(_fused_timeout, 2, timeout=60)
    message, seconds = out[0]
    assert "rank 0" in message and "site 2 (layer 0, o_proj)" in message and "1 of 2 ranks' values" in message
    assert seconds < 10 and out[1] == "no error"  # 12 s had every site waited
