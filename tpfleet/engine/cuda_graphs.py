"""CUDA graphs: launch a whole decode step, or most of a prefill step, with one call each.

Full graphs cover decode batches: one graph per batch-size bucket, all reading fixed input
buffers. A batch is padded up to its bucket with rows that write no KV (slot -1) and attend to
nothing (context 0). Capture runs largest bucket first, into one memory pool shared by all.

Piecewise graphs cover prefill and mixed batches of up to 512 tokens, whose attention shapes vary
too much to capture: per token-count bucket, each stretch between two attentions (o_proj, MLP, the
all-reduces, the next layer's norm and qkv projection) is one graph, and attention runs eagerly
between them.

Both kinds contain the tensor-parallel all-reduces; tpfleet.comm's kernels are graph-safe as is.

Graphs are captured through the rank's memory saver (tpfleet.memory): their pool and their fixed input
buffers belong to its `cuda_graph` tag, so with the saver on they are released and mapped back at the
same addresses, and replay after a resume without re-capture.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from tpfleet.attention.backend import AttentionMetadata
from tpfleet.engine.step_input import ModelInput, StepLayout, copy_from_host, fill_pending
from tpfleet.memory import CUDA_GRAPH, Saver

DECODE_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
# Piecewise graphs pay off while a step is launch-bound (a 256-token step: 31% less time). Larger
# steps spend their time in compute-bound GEMMs, where padding to a bucket costs compute in
# proportion (a 356-token step padded to 512 computes 44% more rows): buckets stop at 512 and sit
# close together, and larger steps run eagerly.
TOKEN_BUCKETS = [16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


def _bucket(n: int, buckets: list[int]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class DecodeGraphs:
    """Every graph reads its inputs from the front of two flat buffers, packed as `StepLayout` says,
    so a step is staged by two host-to-device copies, one per integer width. The block tables then
    take one copy into `tables`, whose rows are as wide as the longest context; everything else is
    read in place."""

    def __init__(self, model, device: torch.device, block_size: int, max_batch: int, max_blocks: int,
                 saver: Saver, show_progress: bool):
        self.model = model
        self.buckets = [b for b in DECODE_BUCKETS if b <= max_batch] or [1]
        largest = self.buckets[-1]
        num_longs, num_ints = StepLayout.capacity(largest, max_blocks)
        with saver.region(CUDA_GRAPH):
            self.longs = torch.zeros(num_longs, dtype=torch.int64, device=device)
            self.ints = torch.zeros(num_ints, dtype=torch.int32, device=device)
            self.tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.staged_slots: torch.Tensor | None = None  # the last replay's KV slots, padded to its bucket
        for bucket in tqdm(sorted(self.buckets, reverse=True), desc="Capturing decode graphs",
                           disable=not show_progress):
            layout = StepLayout.padding(bucket)
            ids = self.longs[layout.input_ids]
            positions = self.longs[layout.positions]
            slots = self.longs[layout.slot_mapping]
            slots.fill_(-1)  # padding rows: no KV written, nothing attended to (their context lengths are 0)
            meta = AttentionMetadata(slots, self.tables[:bucket], self.ints[layout.context_lens], [1] * bucket,
                                     [1] * bucket, bucket, block_size)
            self.model(ids, positions, meta)  # warm-up: kernels compiled, handles made
            graph = torch.cuda.CUDAGraph()
            with saver.graph(graph):
                self.outputs[bucket] = self.model(ids, positions, meta)
            self.graphs[bucket] = graph

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def run(self, inp: ModelInput, sampled: torch.Tensor | None) -> torch.Tensor:
        """Stage a decode batch's inputs, padded to its bucket, and replay that bucket's graph. Pending
        input tokens come from `sampled`, the tokens of the step before, on the device. Returns the
        final hidden states of the rows that sample (not every row when one is a one-token prefill
        chunk short of its prompt's end)."""
        batch = len(inp.context_lens)
        bucket = _bucket(batch, self.buckets)
        layout = StepLayout.of(inp, padded_rows=bucket, query_info=False)
        longs, ints = layout.pack(inp)
        copy_from_host(longs, self.longs)
        copy_from_host(ints, self.ints)
        width = layout.table_width
        self.tables[:batch, :width].copy_(self.ints[layout.block_tables].view(batch, width))
        if layout.num_pending:
            fill_pending(self.longs[layout.input_ids], self.longs[layout.pending_rows],
                         self.longs[layout.pending_src], sampled, inp.pending_rows)
        self.graphs[bucket].replay()
        self.staged_slots = self.longs[layout.slot_mapping]
        hidden = self.outputs[bucket][:batch]
        return hidden[self.longs[layout.sampled_rows]] if layout.num_sampled else hidden


class PiecewiseGraphs:
    def __init__(self, model, device: torch.device, max_tokens: int, saver: Saver, show_progress: bool):
        self.model = model
        self.buckets = [b for b in TOKEN_BUCKETS if b <= max_tokens]
        attn = model.layers[0].self_attn
        dtype = next(model.parameters()).dtype
        n = self.buckets[-1] if self.buckets else 0
        # Every segment reads and writes these fixed buffers (sliced per bucket), so a graph never
        # depends on a tensor that another capture or a warm-up made.
        with saver.region(CUDA_GRAPH):
            self.ids = torch.zeros(n, dtype=torch.int64, device=device)
            self.positions = torch.zeros(n, dtype=torch.int64, device=device)
            self.o = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
            self.q = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
            self.k = torch.zeros(n, attn.num_kv_heads, attn.head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
            self.res = torch.zeros(n, model.cfg.hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        for t in tqdm(sorted(self.buckets, reverse=True), desc="Capturing piecewise graphs",
                      disable=not show_progress):
            graphs = []
            warmed = set()
            for kind, seg in self._segments(t):
                if kind not in warmed:  # warm-up outside the graph, once per kind: same kernels, same shapes
                    seg()
                    warmed.add(kind)
                g = torch.cuda.CUDAGraph()
                with saver.graph(g):
                    out = seg()
                graphs.append(g)
            self.graphs[t] = graphs
            self.hidden[t] = out

    def _segments(self, t: int):
        """The stretches between attentions, for bucket t: post(i-1) + pre(i), each with its kind (segments
        of one kind launch the same kernels on the same shapes: the kind of layer i-1 decides)."""
        layers = self.model.layers
        ids, pos, o, res = self.ids[:t], self.positions[:t], self.o[:t], self.res[:t]

        def emit(q, k, v, r):
            self.q[:t].copy_(q)
            self.k[:t].copy_(k)
            self.v[:t].copy_(v)
            res.copy_(r)

        def first():
            emit(*layers[0].pre(pos, self.model.embed_tokens(ids), None))

        def middle(i):
            def seg():
                emit(*layers[i].pre(pos, *layers[i - 1].post(o, res)))
            return seg

        def last():
            return self.model.norm(*layers[-1].post(o, res))[0]

        return ([("first", first)] + [(("middle", type(layers[i - 1])), middle(i)) for i in range(1, len(layers))] +
                [(("last", type(layers[-1])), last)])

    def can_run(self, num_tokens: int) -> bool:
        return bool(self.buckets) and num_tokens <= self.buckets[-1]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = ids.shape[0]
        t = _bucket(n, self.buckets)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.ids[n:t].zero_()
        self.positions[n:t].zero_()
        graphs = self.graphs[t]
        for i, layer in enumerate(self.model.layers):
            graphs[i].replay()
            layer.self_attn.attend(self.q[:n], self.k[:n], self.v[:n], meta, out=self.o[:n])
        graphs[-1].replay()
        return self.hidden[t][:n]


def capture(model, device, block_size: int, max_batch: int, max_blocks: int, max_tokens: int, mode: str,
            saver: Saver, show_progress: bool) -> tuple[DecodeGraphs | None, PiecewiseGraphs | None, dict]:
    """Capture the graphs `mode` asks for ('full' or 'piecewise', which is full plus piecewise), all
    into the pool of the saver's cuda_graph tag."""
    torch.cuda.synchronize(device)
    free_before = torch.cuda.mem_get_info(device)[0]
    t0 = time.perf_counter()
    decode = DecodeGraphs(model, device, block_size, max_batch, max_blocks, saver, show_progress)
    piecewise = PiecewiseGraphs(model, device, max_tokens, saver, show_progress) if mode == "piecewise" else None
    torch.cuda.synchronize(device)
    stats = {"seconds": round(time.perf_counter() - t0, 2),
             "memory_bytes": free_before - torch.cuda.mem_get_info(device)[0],
             "decode_buckets": decode.buckets, "token_buckets": piecewise.buckets if piecewise else []}
    return decode, piecewise, stats
