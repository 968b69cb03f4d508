"""`tpfleet bench attention`: decode attention per split policy, against the bandwidth floor.

The decode kernel launches a fixed number of splits per (sequence, kv head), and a context uses
min(splits, ceil(tokens / min_split)) of them. `min_split` 1 is the policy of using every split
whatever the context; each policy is timed inside a CUDA graph, Qwen3-8B's heads at TP=1, on
shuffled pages, so that `MIN_SPLIT_TOKENS` rests on a measurement.

`--tiles` times, at the batches and contexts RL rollouts run at, every tile (tokens per tile, warps,
pipeline stages) with every split count, against the default choice: what the large-batch policy of
`decode_attention` rests on. Beside the default it times the engine's decode input, the qkv projection,
which the kernel norms, rotates and stores before it attends.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tpfleet.attention.backend import NewTokens
from tpfleet.bench.engine import copy_bandwidth
from tpfleet.bench.gemv import graph_time_us
from tpfleet.kernels.attention import MIN_SPLIT_TOKENS, decode_attention, decode_splits

KV_HEADS, GROUP, HEAD_DIM, PAGE = 8, 4, 128, 16
CONTEXTS = (144, 512, 2048, 8192)
MIN_SPLITS = (1, MIN_SPLIT_TOKENS, 128, 256)
TILES = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (32, 4, 4))
SPLIT_COUNTS = (1, 2, 4, 8)


def _case(batch: int, ctx: int, dtype: torch.dtype, g: torch.Generator) -> tuple:
    """Qwen3-8B's one-layer KV cache for `batch` sequences of `ctx` tokens on shuffled pages, and a query."""
    device = g.device
    pages = -(-ctx // PAGE)
    kc = torch.randn(batch * pages, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    tables = torch.randperm(batch * pages, device=device, generator=g).to(torch.int32).view(batch, pages)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM, device=device, dtype=dtype, generator=g)
    return q, kc, vc, tables, lens


def _from_qkv(q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, g: torch.Generator
              ) -> tuple[torch.Tensor, NewTokens]:
    """The engine's decode input for the same query shape: a qkv projection's rows, which the kernel
    norms, rotates and stores (the newest token's key and value) before attending."""
    batch, device = q.shape[0], q.device
    qkv = torch.randn(batch, (KV_HEADS * GROUP + 2 * KV_HEADS) * HEAD_DIM, device=device, dtype=q.dtype, generator=g)
    positions = lens.long() - 1
    slots = tables.gather(1, (positions // PAGE).view(-1, 1)).view(-1).long() * PAGE + positions % PAGE
    norm = torch.ones(HEAD_DIM, device=device, dtype=q.dtype)
    angles = torch.rand(int(positions.max()) + 1, HEAD_DIM // 2, device=device, generator=g)
    return qkv, NewTokens(positions, slots, norm, norm, 1e-6, angles.cos(), angles.sin())


def _setup() -> tuple[torch.device, float, torch.Generator]:
    """The GPU, its copy bandwidth (bytes per second) and a seeded generator on it."""
    device = torch.device("cuda")
    return device, copy_bandwidth(device), torch.Generator(device).manual_seed(0)


def _write(out_dir: str, name: str, device: torch.device, bw: float, rows: list[dict]) -> None:
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / name).write_text(json.dumps({"device": torch.cuda.get_device_name(device), "copy_bandwidth": bw,
                                             "rows": rows}, indent=1))


def bench_attention(out_dir: str, batches: tuple[int, ...] = (1, 8), dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    device, bw, g = _setup()
    rows = []
    print(f"decode attention, {torch.cuda.get_device_name(device)}, {dtype}, {KV_HEADS} kv heads x {GROUP}, "
          f"head_dim {HEAD_DIM}; us per call; min_split 1 = every split used")
    print(f"{'batch':>5} {'context':>7} {'floor':>6} " + " ".join(f"{'min ' + str(m):>8}" for m in MIN_SPLITS))
    for batch in batches:
        for ctx in CONTEXTS:
            q, kc, vc, tables, lens = _case(batch, ctx, dtype, g)
            out = torch.empty_like(q)
            row = {"batch": batch, "context": ctx, "floor_us": 2 * kc.numel() * kc.element_size() / bw * 1e6}
            for m in MIN_SPLITS:
                row[f"min_split_{m}_us"] = graph_time_us(
                    lambda i=0, m=m: decode_attention(q, kc, vc, tables, lens, HEAD_DIM ** -0.5, out, min_split=m), 20)
            rows.append(row)
            print(f"{batch:>5} {ctx:>7} {row['floor_us']:>6.1f} "
                  + " ".join(f"{row[f'min_split_{m}_us']:>8.1f}" for m in MIN_SPLITS), flush=True)
    _write(out_dir, "attention.json", device, bw, rows)
    return rows


def bench_attention_tiles(out_dir: str, batches: list[int], contexts: list[int],
                          dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Every tile of TILES with every split count of SPLIT_COUNTS, per (batch, context): microseconds per
    call and the ratio to the floor; the best and the default side by side."""
    device, bw, g = _setup()
    rows = []
    print(f"decode attention tiles, {torch.cuda.get_device_name(device)}, {dtype}, copy {bw / 1e9:.0f} GB/s; "
          f"us per call (x floor); tile = (tokens, warps, stages)")
    for batch in batches:
        for ctx in contexts:
            free, _ = torch.cuda.mem_get_info(device)
            if 2.2 * batch * ctx * KV_HEADS * HEAD_DIM * dtype.itemsize > free:
                print(f"{batch:>5} {ctx:>7}: skipped, its KV cache does not fit")
                continue
            q, kc, vc, tables, lens = _case(batch, ctx, dtype, g)
            out = torch.empty_like(q)
            floor = 2 * kc.numel() * kc.element_size() / bw * 1e6
            scale = HEAD_DIM ** -0.5
            row = {"batch": batch, "context": ctx, "floor_us": floor,
                   "default_splits": decode_splits(batch, KV_HEADS, device)}
            row["default_us"] = graph_time_us(lambda i=0: decode_attention(q, kc, vc, tables, lens, scale, out), 10)
            qkv, new = _from_qkv(q, tables, lens, g)
            row["from_qkv_us"] = graph_time_us(
                lambda i=0: decode_attention(qkv, kc, vc, tables, lens, scale, out, new=new), 10)
            row["tiles"] = {}
            for tile in TILES:
                for splits in SPLIT_COUNTS:
                    row["tiles"][f"{tile}x{splits}"] = graph_time_us(
                        lambda i=0, t=tile, s=splits: decode_attention(q, kc, vc, tables, lens, scale, out, splits=s,
                                                                       tile=t), 10)
            best = min(row["tiles"], key=row["tiles"].get)
            row["best"], row["best_us"] = best, row["tiles"][best]
            rows.append(row)
            print(f"{batch:>5} {ctx:>7} floor {floor:>8.1f}  default {row['default_us']:>8.1f} "
                  f"({row['default_us'] / floor:.2f}x, {row['default_splits']} split)  from qkv "
                  f"{row['from_qkv_us']:>8.1f} ({row['from_qkv_us'] / floor:.2f}x)  best {row['best_us']:>8.1f} "
                  f"({row['best_us'] / floor:.2f}x, {best})", flush=True)
    _write(out_dir, "attention_tiles.json", device, bw, rows)
    return rows
