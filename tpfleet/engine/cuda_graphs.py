"""CUDA graphs: launch a whole decode step, or most of a prefill step, with one call each.

Full graphs cover decode batches: one graph per batch-size bucket, all reading fixed input
buffers. A batch is padded up to its bucket with rows that write no KV (slot -1) and attend to
nothing (context 0). Capture runs largest bucket first, into one memory pool shared by all.

Piecewise graphs cover prefill and mixed batches of up to 512 tokens, whose attention shapes vary
too much to capture: per token-count bucket, each stretch between two attentions (o_proj, MLP, the
all-reduces, the next layer's norm and qkv projection) is one graph, and attention runs eagerly
between them.

Both kinds contain the tensor-parallel all-reduces; tpfleet.comm's kernels are graph-safe as is.

At start only the largest bucket of each kind is captured: it fixes the pool's high-water mark and shows
that capture works on this rank, in two forwards instead of two per bucket. Every other bucket is captured
on the first step that needs it (one warm-up and one capture: 50-150 ms for the 8b shape on an H100; all
ranks take the same step, so they capture together). `capture_all` captures every bucket at start instead, as the
warm-up command does so that each bucket's kernels are compiled before a served step needs them.

Graphs are captured through the rank's memory saver (tpfleet.memory): their pool and their fixed input
buffers belong to its `cuda_graph` tag, so with the saver on they are released and mapped back at the
same addresses, and replay after a resume without re-capture.
"""

from __future__ import annotations

import logging
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


log = logging.getLogger("tpfleet.engine")


def _bucket(n: int, buckets: list[int]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class BucketGraphs:
    """Graphs per bucket, each captured when first needed. `memory_bytes` (as the driver saw it) counts the
    fixed input buffers and every capture so far, `seconds` every capture."""

    def __init__(self, device: torch.device, buckets: list[int], saver: Saver, show_progress: bool):
        self.device = device
        self.buckets = buckets
        self.saver = saver
        self.show_progress = show_progress  # rank 0's: progress bars at start, a log line per later capture
        self.started = False
        self.graphs: dict[int, object] = {}
        self._free_at_init = torch.cuda.mem_get_info(device)[0]
        self.memory_bytes = 0
        self.seconds = 0.0

    def _capture(self, bucket: int) -> None:
        raise NotImplementedError

    def ensure(self, bucket: int) -> None:
        if bucket in self.graphs:
            return
        # Emptied first, as capture itself does: the allocator's cached blocks going back to the driver are
        # not the graph's memory.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        t0 = time.perf_counter()
        self._capture(bucket)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.memory_bytes += free_before - torch.cuda.mem_get_info(self.device)[0]
        if self.started and self.show_progress:
            log.info("%s graph for bucket %d captured on its first use in %.0f ms", type(self).__name__, bucket,
                     1e3 * seconds)

    def capture_at_start(self, capture_all: bool, desc: str) -> None:
        """Largest first: later captures then reuse the pool's blocks."""
        self.memory_bytes = self._free_at_init - torch.cuda.mem_get_info(self.device)[0]  # the input buffers
        todo = sorted(self.buckets, reverse=True) if capture_all else self.buckets[-1:]
        for bucket in tqdm(todo, desc=desc, disable=not self.show_progress or len(todo) < 2):
            self.ensure(bucket)
        self.started = True


class DecodeGraphs(BucketGraphs):
    """Every graph reads its inputs from the front of two flat buffers, packed as `StepLayout` says,
    so a step is staged by two host-to-device copies, one per integer width. The block tables then
    take one copy into `tables`, whose rows are as wide as the longest context; everything else is
    read in place."""

    def __init__(self, model, device: torch.device, block_size: int, max_batch: int, max_blocks: int,
                 saver: Saver, capture_all: bool, show_progress: bool):
        super().__init__(device, [b for b in DECODE_BUCKETS if b <= max_batch] or [1], saver, show_progress)
        self.model = model
        self.block_size = block_size
        largest = self.buckets[-1]
        num_longs, num_ints = StepLayout.capacity(largest, max_blocks)
        with saver.region(CUDA_GRAPH):
            self.longs = torch.zeros(num_longs, dtype=torch.int64, device=device)
            self.ints = torch.zeros(num_ints, dtype=torch.int32, device=device)
            self.tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        self.outputs: dict[int, torch.Tensor] = {}
        self.staged_slots: torch.Tensor | None = None  # the last replay's KV slots, padded to its bucket
        self.capture_at_start(capture_all, "Capturing decode graphs")

    def _capture(self, bucket: int) -> None:
        layout = StepLayout.padding(bucket)
        ids = self.longs[layout.input_ids]
        positions = self.longs[layout.positions]
        slots = self.longs[layout.slot_mapping]
        # Padding rows: no KV written, nothing attended to. The buffers may hold an earlier step's inputs;
        # the step that follows a capture stages its own.
        self.longs.zero_()
        self.ints.zero_()
        slots.fill_(-1)
        meta = AttentionMetadata(slots, self.tables[:bucket], self.ints[layout.context_lens], [1] * bucket,
                                 [1] * bucket, bucket, self.block_size)
        self.model(ids, positions, meta)  # warm-up: kernels compiled, handles made
        graph = torch.cuda.CUDAGraph()
        with self.saver.graph(graph):
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
        self.ensure(bucket)
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


class PiecewiseGraphs(BucketGraphs):
    def __init__(self, model, device: torch.device, max_tokens: int, saver: Saver, capture_all: bool,
                 show_progress: bool):
        super().__init__(device, [b for b in TOKEN_BUCKETS if b <= max_tokens], saver, show_progress)
        self.model = model
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
        self.hidden: dict[int, torch.Tensor] = {}
        self.capture_at_start(capture_all, "Capturing piecewise graphs")

    def _capture(self, t: int) -> None:
        # The segments' warm-ups read these: zeros, not an earlier step's values or, after the saver resumed
        # them, undefined memory (an out-of-range token id or position would fault).
        for buffer in (self.ids, self.positions, self.o, self.res):
            buffer.zero_()
        graphs = []
        warmed = set()
        for kind, seg in self._segments(t):
            if kind not in warmed:  # warm-up outside the graph, once per kind: same kernels, same shapes
                seg()
                warmed.add(kind)
            g = torch.cuda.CUDAGraph()
            with self.saver.graph(g):
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
        self.ensure(t)
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
            saver: Saver, capture_all: bool, show_progress: bool) -> tuple[DecodeGraphs, PiecewiseGraphs | None, dict]:
    """Capture the graphs `mode` asks for ('full' or 'piecewise', which is full plus piecewise), all
    into the pool of the saver's cuda_graph tag: every bucket with `capture_all`, else the largest of each kind."""
    torch.cuda.synchronize(device)
    decode = DecodeGraphs(model, device, block_size, max_batch, max_blocks, saver, capture_all, show_progress)
    piecewise = (PiecewiseGraphs(model, device, max_tokens, saver, capture_all, show_progress)
                 if mode == "piecewise" else None)
    kinds = [decode] + ([piecewise] if piecewise else [])
    stats = {"seconds": round(sum(g.seconds for g in kinds), 2), "memory_bytes": sum(g.memory_bytes for g in kinds),
             "decode_buckets": sorted(decode.graphs), "token_buckets": sorted(piecewise.graphs) if piecewise else []}
    return decode, piecewise, stats
