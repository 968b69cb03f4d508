"""`tpfleet bench attention`: decode attention per split policy, against the bandwidth floor.

The decode kernel launches a fixed number of splits per (sequence, kv head), and a context uses
min(splits, ceil(tokens / min_split)) of them. `min_split` 1 is the policy of using every split
whatever the context; each policy is timed inside a CUDA graph, Qwen3-8B's heads at TP=1, on
shuffled pages, so that `MIN_SPLIT_TOKENS` rests on a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tpfleet.bench.engine import copy_bandwidth
from tpfleet.bench.gemv import graph_time_us
from tpfleet.kernels.attention import MIN_SPLIT_TOKENS, decode_attention

KV_HEADS, GROUP, HEAD_DIM, PAGE = 8, 4, 128, 16
CONTEXTS = (144, 512, 2048, 8192)
MIN_SPLITS = (1, MIN_SPLIT_TOKENS, 128, 256)


def bench_attention(out_dir: str, batches: tuple[int, ...] = (1, 8), dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    g = torch.Generator(device).manual_seed(0)
    rows = []
    print(f"decode attention, {torch.cuda.get_device_name(device)}, {dtype}, {KV_HEADS} kv heads x {GROUP}, "
          f"head_dim {HEAD_DIM}; us per call; min_split 1 = every split used")
    print(f"{'batch':>5} {'context':>7} {'floor':>6} " + " ".join(f"{'min ' + str(m):>8}" for m in MIN_SPLITS))
    for batch in batches:
        for ctx in CONTEXTS:
            pages = -(-ctx // PAGE)
            kc = torch.randn(batch * pages, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
            vc = torch.randn_like(kc)
            tables = torch.randperm(batch * pages, device=device, generator=g).to(torch.int32).view(batch, pages)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM, device=device, dtype=dtype, generator=g)
            out = torch.empty_like(q)
            row = {"batch": batch, "context": ctx, "floor_us": 2 * kc.numel() * kc.element_size() / bw * 1e6}
            for m in MIN_SPLITS:
                row[f"min_split_{m}_us"] = graph_time_us(
                    lambda i=0, m=m: decode_attention(q, kc, vc, tables, lens, HEAD_DIM ** -0.5, out, min_split=m), 20)
            rows.append(row)
            print(f"{batch:>5} {ctx:>7} {row['floor_us']:>6.1f} "
                  + " ".join(f"{row[f'min_split_{m}_us']:>8.1f}" for m in MIN_SPLITS), flush=True)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "attention.json").write_text(json.dumps({"device": torch.cuda.get_device_name(device),
                                                         "copy_bandwidth": bw, "rows": rows}, indent=1))
    return rows
