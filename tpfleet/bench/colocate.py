"""`tpfleet bench colocate`: the cost of sharing GPUs with a trainer, per RL step, against its floor.

Each cycle releases every memory tag, resumes them, and takes a full weight update from a trainer
process that holds the same weights on the same device (tpfleet.weight_sync.FlattenedBucketSender:
CUDA IPC on a GPU, shared memory on the CPU). The update is timed end to end as an RL step runs it:
the trainer packs its weights into the buckets again (`refill`, the same handles), then the engine
takes them. After every cycle the greedy outputs must equal those before the first (the weights
really arrived) and no graph may have been captured again.

Floors, from rates measured in the same run on the same device (FLOORS says it in words): a weight
update copies the weights twice, the trainer's into its buckets and the buckets into the engine's
parameters, each read once and written once, over a large device copy's bandwidth (which counts bytes
read plus bytes written). A release or a resume moves only the bytes that cross to or from host memory
(weights without the memory saver, or its pinned backup), over a pinned host copy's bandwidth;
unmapping and mapping memory count as free, so with the saver and no backup their floor is 0 and their
times stand alone.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from safetensors import safe_open

from tpfleet.bench import report
from tpfleet.bench.engine import copy_bandwidth, device_name
from tpfleet.config import EngineConfig
from tpfleet.engine.llm_engine import LLMEngine
from tpfleet.engine.sequence import SamplingParams
from tpfleet.memory import TAGS
from tpfleet.model.config import ModelConfig
from tpfleet.model.loader import checkpoint_files

FLOORS = ("update: 4 x the driver's weight bytes / device copy bandwidth (packed by the trainer, then copied "
          "into the parameters, each read + write); release and resume: "
          "bytes copied to or from host memory / pinned host copy bandwidth, unmapping and mapping counted "
          "as free (floor 0 with the memory saver and no backup)")
PROMPTS = ([1, 2, 3, 4, 5, 6, 7, 8], [42, 17, 99, 3], [7] * 12)
NEW_TOKENS = 16
MEMORY_TOLERANCE = 0.01
TRAINER_TIMEOUT_S = 600


def _trainer_main(model_dir: str, device: str, dtype: str, conn: Connection) -> None:
    """The trainer: the checkpoint's tensors on `device` in the engine's dtype, packed into buckets;
    sends the payload, then packs them again on every "refill" (answering with the seconds it took)
    until told to stop."""
    from tpfleet.weight_sync import FlattenedBucketSender

    named = []
    for path in checkpoint_files(Path(model_dir)):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            named += [(name, handle.get_tensor(name).to(device=device, dtype=getattr(torch, dtype)))
                      for name in handle.keys()]
    with FlattenedBucketSender(named, device=device) as sender:
        conn.send(sender.payload())
        while conn.recv() == "refill":
            start = time.perf_counter()
            sender.refill(named)
            conn.send(time.perf_counter() - start)


@contextmanager
def trainer_payload(model_dir: str, device: str, dtype: str) -> Iterator[tuple[str, Connection]]:
    """A trainer process holding the checkpoint's weights on `device` in `dtype` ("bfloat16"), the
    payload that shares them (an engine cannot open CUDA IPC memory of its own process), and the
    connection that asks it to refill them. The trainer stops when the block ends."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    trainer = ctx.Process(target=_trainer_main, args=(model_dir, device, dtype, theirs), daemon=True)
    trainer.start()
    theirs.close()  # the child's end: a trainer that dies ends our recv with EOFError instead of a hang
    try:
        if not ours.poll(TRAINER_TIMEOUT_S):
            raise RuntimeError(f"the trainer process sent no payload within {TRAINER_TIMEOUT_S} s")
        yield ours.recv(), ours
    finally:
        if trainer.is_alive():
            try:
                ours.send("stop")
            except OSError:  # it is exiting already
                pass
        trainer.join(timeout=60)
        if trainer.is_alive():
            trainer.kill()


def host_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Bytes per second of a pinned host-to-device copy (None on the CPU: there is no host side)."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    del dev
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times[1:])


def greedy_outputs(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    seqs = [engine.add_request(list(prompt), params) for prompt in PROMPTS]
    while engine.has_work():
        engine.step()
    return [seq.completion_ids for seq in seqs]


def _timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _free(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def _summary(seconds: list[float], floor_s: float) -> dict:
    median = statistics.median(seconds)
    return {"median_ms": 1e3 * median, "min_ms": 1e3 * min(seconds), "max_ms": 1e3 * max(seconds),
            "floor_ms": 1e3 * floor_s, "vs_floor": median / floor_s if floor_s > 0 else None}


def _host_bytes(cfg: EngineConfig, device: torch.device, weight_bytes: int) -> int:
    """Bytes a release (or a resume) copies between the driver's device and host memory."""
    if device.type != "cuda" or (cfg.enable_memory_saver and not cfg.weights_cpu_backup):
        return 0
    return weight_bytes


def bench_colocate(cfg: EngineConfig, out_dir: str, cycles: int = 20) -> dict:
    """Release (every tag), resume and update, `cycles` times; timings per phase against their floors,
    and the checks that make the numbers mean something. Writes colocate_tp<N>.json under out_dir."""
    device = torch.device(cfg.rank_device(0))
    dtype = cfg.dtype if cfg.dtype != "auto" else ModelConfig.from_dir(cfg.model).dtype
    # The trainer first, so that the engine sizes its KV cache around the trainer's weights.
    with trainer_payload(cfg.model, str(device), dtype) as (payload, trainer):
        device_bw, host_bw = copy_bandwidth(device), host_copy_bandwidth(device)  # before the engine takes memory
        engine = LLMEngine(cfg)
        try:
            result = _cycles(engine, payload, trainer, cycles)
        finally:
            engine.shutdown()
    weight_bytes = result["weight_bytes_per_rank"]
    host_bytes = _host_bytes(cfg, device, weight_bytes)
    host_floor = host_bytes / host_bw if host_bw and host_bytes else 0.0
    rows = result["per_cycle"]
    result.update({
        "device": device_name(device), "tp_size": cfg.tp_size, "memory_saver": cfg.enable_memory_saver,
        "weights_cpu_backup": cfg.weights_cpu_backup, "graph_mode": cfg.resolved_graph_mode, "cycles": cycles,
        "copy_bandwidth_gbs": device_bw / 1e9, "host_copy_bandwidth_gbs": host_bw / 1e9 if host_bw else None,
        "floors": FLOORS,
        "release": _summary([r["release_s"] for r in rows], host_floor),
        "resume": _summary([r["resume_s"] for r in rows], host_floor),
        "update": _summary([r["update_s"] for r in rows], 4 * weight_bytes / device_bw),
        "trainer_refill": _summary([r["refill_s"] for r in rows], 2 * weight_bytes / device_bw),
        "engine_stage": _summary([r["stage_s"] for r in rows], 0.0),
        "engine_commit": _summary([r["commit_s"] for r in rows], 2 * weight_bytes / device_bw),
    })
    return report(result, out_dir, f"colocate_tp{cfg.tp_size}", format_result)


def _update(engine: LLMEngine, payload: str, trainer: Connection, version: str) -> dict:
    """The trainer packs its weights again, then the engine takes them: the seconds of the trainer's
    refill and of the engine's stage (checks, buffers opened) and commit (copies)."""
    trainer.send("refill")
    if not trainer.poll(TRAINER_TIMEOUT_S):
        raise RuntimeError(f"the trainer did not refill its buckets within {TRAINER_TIMEOUT_S} s")
    refill_s = trainer.recv()
    report = engine.update_weights_from_tensor([payload], "flattened_bucket", version)[0]
    return {"refill_s": refill_s, "stage_s": report["stage_s"], "commit_s": report["commit_s"]}


def _cycles(engine: LLMEngine, payload: str, trainer: Connection, cycles: int) -> dict:
    device = engine.runner.device
    reference = greedy_outputs(engine)
    captures = [report["graph_captures"] for report in engine.resume_memory([])]  # every rank's count
    rows = []
    for cycle in range(cycles):
        release_s, released = _timed(lambda: engine.release_memory(list(TAGS)))
        resume_s, resumed = _timed(lambda: engine.resume_memory(list(TAGS)))
        update_s, parts = _timed(lambda: _update(engine, payload, trainer, f"cycle-{cycle}"))
        outputs = greedy_outputs(engine)
        rows.append({"cycle": cycle, "release_s": release_s, "resume_s": resume_s, "update_s": update_s, **parts,
                     "outputs_equal": outputs == reference,
                     "graph_captures": [report["graph_captures"] for report in resumed],
                     "released_bytes_per_tag": released[0]["bytes_per_tag"],
                     "device_freed_bytes": [report["device_freed_bytes"] for report in released],
                     "free_bytes_after": _free(device)})
    first, last = rows[0]["free_bytes_after"], rows[-1]["free_bytes_after"]
    drift = abs(last - first) / first if first else None
    return {"weight_bytes_per_rank": sum(p.numel() * p.element_size() for p in engine.runner.model.parameters()),
            "outputs_equal": all(r["outputs_equal"] for r in rows),
            "graphs_recaptured": any(r["graph_captures"] != captures for r in rows),
            "free_memory_drift": drift,
            "free_memory_stable": None if drift is None else drift <= MEMORY_TOLERANCE,
            "per_cycle": rows}


def format_result(r: dict) -> str:
    def phase(name: str, label: str | None = None) -> str:
        s = r[name]
        floor = f", floor {s['floor_ms']:.2f} ms ({s['vs_floor']:.1f}x)" if s["vs_floor"] is not None else ""
        return f"{label or name} {s['median_ms']:.2f} ms [{s['min_ms']:.2f}, {s['max_ms']:.2f}]{floor}"

    drift = r["free_memory_drift"]
    return (f"colocate bench: {r['device']}, TP={r['tp_size']}, memory saver {'on' if r['memory_saver'] else 'off'}, "
            f"{r['cycles']} cycles of release/resume/update ({r['weight_bytes_per_rank'] / 2**20:.1f} MiB of "
            f"weights per rank)\n  " + "; ".join(phase(n) for n in ("release", "resume", "update")) +
            f"\n  of the update: {phase('trainer_refill', 'the trainer packing its buckets')}; "
            f"{phase('engine_stage', 'the engine checking and opening them')}; "
            f"{phase('engine_commit', 'the engine copying them')}" +
            f"\n  outputs equal before and after every cycle: {r['outputs_equal']}; graphs re-captured: "
            f"{r['graphs_recaptured']}; free memory drift over the cycles: "
            f"{'n/a (CPU)' if drift is None else f'{100 * drift:.2f}%'}")
