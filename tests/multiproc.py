"""Run a function in one process per GPU with an NCCL group, and collect each rank's result."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from datetime import timedelta

from tpfleet.comm.group import create_store


def _entry(fn, rank, world, port, q, args):
    import torch
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, env: dict[str, str] | None = None, timeout: float = 300) -> list:
    """fn(rank, world, *args) in `world` processes; returns their results in rank order, or raises
    with every failing rank's traceback. A rank that hangs past `timeout` fails the call."""
    store = create_store(world)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store.port, q, args)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, tuple[str, object]] = {}
    try:
        while len(results) < world:
            rank, status, value = q.get(timeout=timeout)
            results[rank] = (status, value)
    except queue.Empty:
        missing = sorted(set(range(world)) - set(results))
        raise TimeoutError(f"ranks {missing} did not finish in {timeout}s") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(results.items()) if s != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r][1] for r in range(world)]
