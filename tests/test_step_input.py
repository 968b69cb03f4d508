"""The packed step input (tpfleet.engine.step_input): every field of a `ModelInput` is read back from
the offsets of `StepLayout` by both of its consumers, the eager path (ModelRunner._to_device) and the
decode graphs (DecodeGraphs.run, staged on the CPU with each graph replaced by a recorder)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tpfleet.engine.cuda_graphs import DecodeGraphs
from tpfleet.engine.model_runner import ModelRunner
from tpfleet.engine.step_input import ModelInput, StepLayout

SAMPLED = torch.tensor([70, 71, 72])  # the step before's tokens, on the device

# Two decodes whose tokens are pending (rows 0 and 1), a prefill chunk that samples nothing yet, and
# the end of a prompt that samples its last row.
MIXED = ModelInput(input_ids=[0, 0, 11, 12, 13, 21, 22], positions=[9, 4, 0, 1, 2, 6, 7],
                   slot_mapping=[41, 52, 60, 61, 62, 30, 31], block_tables=[[2, 3, 5], [7, 8], [9], [4, 6]],
                   context_lens=[10, 5, 3, 8], query_lens=[1, 1, 3, 2], num_decodes=2, logits_indices=[0, 1, 6],
                   pending_rows=[0, 1], pending_src=[1, 0])

# A decode-graph batch: rows 0 and 2 wait for tokens of the step before (not the first rows in order),
# row 1 is a one-token prefill chunk that samples nothing yet.
DECODES = ModelInput(input_ids=[0, 9, 0], positions=[5, 1, 7], slot_mapping=[21, 33, 47],
                     block_tables=[[1], [2, 3], [4]], context_lens=[6, 2, 8], query_lens=[1, 1, 1], num_decodes=3,
                     logits_indices=[0, 2], pending_rows=[0, 2], pending_src=[2, 0])


def fields(layout: StepLayout) -> tuple[dict[str, slice], dict[str, slice]]:
    longs = {name: getattr(layout, name) for name in
             ("input_ids", "positions", "slot_mapping", "pending_rows", "pending_src", "sampled_rows")}
    ints = {name: getattr(layout, name) for name in ("context_lens", "query_start", "query_lens", "block_tables")}
    return longs, ints


def assert_tiles(slices: dict[str, slice], size: int) -> None:
    """The fields lie one after the other, in the documented order, and cover the buffer exactly."""
    end = 0
    for name, field in slices.items():
        assert field.start == end, (name, field, end)
        end = field.stop
    assert end == size


def test_packing_puts_every_field_at_its_offsets():
    eager = StepLayout.of(MIXED)
    longs, ints = eager.pack(MIXED)
    long_fields, int_fields = fields(eager)
    assert_tiles(long_fields, len(longs))
    assert_tiles(int_fields, len(ints))
    assert {name: longs[field] for name, field in long_fields.items()} == {
        "input_ids": MIXED.input_ids, "positions": MIXED.positions, "slot_mapping": MIXED.slot_mapping,
        "pending_rows": [0, 1], "pending_src": [1, 0], "sampled_rows": [0, 1, 6]}
    assert {name: ints[field] for name, field in int_fields.items()} == {
        "context_lens": [10, 5, 3, 8], "query_start": [0, 1, 2, 5], "query_lens": [1, 1, 3, 2],
        "block_tables": [2, 3, 5, 7, 8, 0, 9, 0, 0, 4, 6, 0]}

    padded = StepLayout.of(DECODES, padded_rows=4, query_info=False)
    longs, ints = padded.pack(DECODES)
    long_fields, int_fields = fields(padded)
    assert_tiles(long_fields, len(longs))
    assert_tiles(int_fields, len(ints))
    assert {name: longs[field] for name, field in long_fields.items()} == {
        "input_ids": [0, 9, 0, 0], "positions": [5, 1, 7, 0], "slot_mapping": [21, 33, 47, -1],
        "pending_rows": [0, 2], "pending_src": [2, 0], "sampled_rows": [0, 2]}
    assert {name: ints[field] for name, field in int_fields.items()} == {
        "context_lens": [6, 2, 8, 0], "query_start": [], "query_lens": [], "block_tables": [1, 0, 2, 3, 4, 0]}


def test_a_batch_that_samples_every_row_packs_no_row_indices():
    inp = ModelInput(input_ids=[0, 0], positions=[3, 4], slot_mapping=[10, 11], block_tables=[[5], [6]],
                     context_lens=[4, 5], query_lens=[1, 1], num_decodes=2, logits_indices=[0, 1],
                     pending_rows=[0, 1], pending_src=[1, 2])
    for layout in (StepLayout.of(inp), StepLayout.of(inp, padded_rows=2, query_info=False)):
        longs, _ = layout.pack(inp)
        assert layout.num_sampled == 0 and layout.sampled_rows.stop == len(longs) == 3 * 2 + 2 * 2


def test_a_decode_graph_reads_at_run_time_where_it_was_captured():
    """A graph is captured reading its bucket's fixed addresses; a step staged into that bucket must
    put its per-row fields at exactly those addresses."""
    for bucket in (1, 4, 8):
        captured = StepLayout.padding(bucket)
        inp = ModelInput(input_ids=[1], positions=[0], slot_mapping=[0], block_tables=[[0]], context_lens=[1],
                         query_lens=[1], num_decodes=1, logits_indices=[0], pending_rows=[], pending_src=[])
        staged = StepLayout.of(inp, padded_rows=bucket, query_info=False)
        for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
            assert getattr(staged, name) == getattr(captured, name), (bucket, name)


def test_the_largest_step_fits_the_graph_buffers():
    rows, max_blocks = 8, 6
    num_longs, num_ints = StepLayout.capacity(rows, max_blocks)
    full = ModelInput(input_ids=[0] * rows, positions=list(range(rows)), slot_mapping=list(range(rows)),
                      block_tables=[list(range(max_blocks))] * rows, context_lens=[1] * rows, query_lens=[1] * rows,
                      num_decodes=rows, logits_indices=list(range(rows - 1)), pending_rows=list(range(rows)),
                      pending_src=list(range(rows)))
    longs, ints = StepLayout.of(full, padded_rows=rows, query_info=False).pack(full)
    assert len(longs) <= num_longs and len(ints) <= num_ints


def test_the_eager_path_reads_every_field():
    runner = object.__new__(ModelRunner)  # only what _to_device reads
    runner.device, runner.cfg, runner.sampled = torch.device("cpu"), SimpleNamespace(block_size=4), SAMPLED
    ids, positions, meta, sampled_rows = runner._to_device(MIXED)
    assert ids.tolist() == [71, 70, 11, 12, 13, 21, 22]  # pending tokens taken from the step before
    assert positions.tolist() == MIXED.positions
    assert meta.slot_mapping.tolist() == MIXED.slot_mapping
    assert meta.block_tables.tolist() == [[2, 3, 5], [7, 8, 0], [9, 0, 0], [4, 6, 0]]
    assert meta.context_lens.tolist() == MIXED.context_lens
    assert meta.query_start.tolist() == [0, 1, 2, 5] and meta.query_lens_dev.tolist() == MIXED.query_lens
    assert meta.query_lens == MIXED.query_lens and meta.context_lens_host == MIXED.context_lens
    assert meta.num_decodes == 2 and meta.block_size == 4
    assert sampled_rows.tolist() == MIXED.logits_indices


class Recorder:
    """Stands in for a bucket's graph: at replay, records every input it would read, from the
    addresses it was captured with."""

    def __init__(self, graphs: DecodeGraphs, bucket: int):
        self.graphs, self.bucket = graphs, bucket

    def replay(self) -> None:
        graphs, captured = self.graphs, StepLayout.padding(self.bucket)
        graphs.seen = {"ids": graphs.longs[captured.input_ids].tolist(),
                       "positions": graphs.longs[captured.positions].tolist(),
                       "slots": graphs.longs[captured.slot_mapping].tolist(),
                       "context_lens": graphs.ints[captured.context_lens].tolist(),
                       "tables": graphs.tables[:self.bucket].tolist()}


def test_the_decode_graphs_read_every_field():
    max_batch, max_blocks = 8, 6
    graphs = object.__new__(DecodeGraphs)  # no capture: the buffers as __init__ makes them, on the CPU
    graphs.buckets = [1, 2, 4, 8]
    num_longs, num_ints = StepLayout.capacity(max_batch, max_blocks)
    graphs.longs = torch.zeros(num_longs, dtype=torch.int64)
    graphs.ints = torch.zeros(num_ints, dtype=torch.int32)
    graphs.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32)
    graphs.outputs = {bucket: torch.arange(2 * bucket, dtype=torch.float32).view(bucket, 2)
                      for bucket in graphs.buckets}
    graphs.graphs = {bucket: Recorder(graphs, bucket) for bucket in graphs.buckets}

    hidden = graphs.run(DECODES, SAMPLED)
    assert graphs.seen["ids"] == [72, 9, 70, 0]
    assert graphs.seen["positions"] == [5, 1, 7, 0]
    assert graphs.seen["slots"] == [21, 33, 47, -1]
    assert graphs.seen["context_lens"] == [6, 2, 8, 0]
    assert [row[:2] for row in graphs.seen["tables"][:3]] == [[1, 0], [2, 3], [4, 0]]
    assert torch.equal(hidden, graphs.outputs[4][[0, 2]])  # the sampled rows, read from their offsets
