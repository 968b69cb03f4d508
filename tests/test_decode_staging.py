"""A decode graph's input staging (tpfleet.engine.cuda_graphs.DecodeGraphs.run) on the CPU: the real
staging code, with each captured graph replaced by a recorder of what its inputs held at replay,
since CUDA graphs need a GPU. tests/test_graphs_gpu.py checks the tokens on a GPU."""

from __future__ import annotations

import torch

from tpfleet.engine.cuda_graphs import DecodeGraphs
from tpfleet.engine.step_input import ModelInput

MAX_BATCH, MAX_BLOCKS = 8, 6


class Recorder:
    """Stands in for bucket b's graph: at replay, records the inputs that graph would read."""

    def __init__(self, graphs: DecodeGraphs, b: int):
        self.graphs, self.b = graphs, b

    def replay(self) -> None:
        g, b = self.graphs, self.b
        ids, positions, slots = g.longs[:3 * b].view(3, b)
        g.seen = {"ids": ids.tolist(), "positions": positions.tolist(), "slots": slots.tolist(),
                  "context_lens": g.ints[:b].tolist(), "tables": g.tables[:b].tolist()}


def staging() -> DecodeGraphs:
    g = object.__new__(DecodeGraphs)  # no capture: the buffers as __init__ makes them, on the CPU
    g.buckets = [1, 2, 4, 8]
    g.longs = torch.zeros(6 * MAX_BATCH, dtype=torch.int64)
    g.ints = torch.zeros(MAX_BATCH + MAX_BATCH * MAX_BLOCKS, dtype=torch.int32)
    g.tables = torch.zeros(MAX_BATCH, MAX_BLOCKS, dtype=torch.int32)
    g.outputs = {b: torch.arange(2 * b, dtype=torch.float32).view(b, 2) for b in g.buckets}
    g.graphs = {b: Recorder(g, b) for b in g.buckets}
    return g


def test_a_padded_batch_with_pending_tokens_and_a_row_that_does_not_sample():
    g = staging()
    sampled = torch.tensor([70, 71, 72])  # the step before's tokens
    # Three rows run in the 4-graph. Rows 0 and 2 wait for tokens of the step before (not the first rows
    # in order); row 1 is a one-token prefill chunk that samples nothing yet.
    inp = ModelInput(input_ids=[0, 9, 0], positions=[5, 1, 7], slot_mapping=[21, 33, 47],
                     block_tables=[[1], [2, 3], [4]], context_lens=[6, 2, 8], query_lens=[1, 1, 1], num_decodes=3,
                     logits_indices=[0, 2], pending_rows=[0, 2], pending_src=[2, 0])
    hidden = g.run(inp, sampled)
    assert g.seen["ids"] == [72, 9, 70, 0]
    assert g.seen["positions"] == [5, 1, 7, 0] and g.seen["slots"] == [21, 33, 47, -1]  # padding stores no KV
    assert g.seen["context_lens"] == [6, 2, 8, 0]  # and attends to nothing
    assert [row[:2] for row in g.seen["tables"][:3]] == [[1, 0], [2, 3], [4, 0]]
    assert torch.equal(hidden, g.outputs[4][[0, 2]])  # only the rows that sample


def test_a_decode_batch_whose_tokens_are_all_pending_in_order():
    g = staging()
    inp = ModelInput(input_ids=[0, 0], positions=[3, 4], slot_mapping=[10, 11], block_tables=[[5], [6]],
                     context_lens=[4, 5], query_lens=[1, 1], num_decodes=2, logits_indices=[0, 1],
                     pending_rows=[0, 1], pending_src=[1, 2])
    hidden = g.run(inp, torch.tensor([70, 71, 72]))
    assert g.seen["ids"] == [71, 72] and g.seen["context_lens"] == [4, 5]
    assert torch.equal(hidden, g.outputs[2])
