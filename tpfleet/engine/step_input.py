"""One step's input: what the driver sends every rank, and how a rank stages it on its device.

The driver turns scheduled sequences into a `ModelInput` of plain lists. A rank packs those lists
into two flat buffers, one per integer width, so that staging a step takes two host-to-device copies
instead of one per field:

    int64: input ids | positions | KV slots | pending rows | pending sources | sampled rows
    int32: context lengths | query starts | query lengths | block tables

`StepLayout` is the one place that says where each field lies. The eager path (ModelRunner) and the
decode graphs (DecodeGraphs) both pack with it and slice with it. A decode graph reads its per-row
fields at fixed addresses sized for its bucket, so the layout can pad them (`pad` rows that write no
KV and attend to nothing); it also leaves out the query starts and lengths, which only eager
attention reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tpfleet.engine.scheduler import ScheduledSeq


@dataclass
class ModelInput:
    input_ids: list[int]  # 0 where a token is still pending on the device
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]
    query_lens: list[int]
    num_decodes: int
    logits_indices: list[int]  # token rows whose logits are computed: sampled rows and scored prompt rows
    pending_rows: list[int]  # rows whose token is the previous step's sample number pending_src[i]
    pending_src: list[int]
    greedy: bool = False  # every sampled row takes the plain argmax, and nothing else needs logits
    scored: list[int] | None = None  # entries of logits_indices that score a prompt token rather than sample

    @classmethod
    def build(cls, batch: list[ScheduledSeq], block_size: int, pending: dict[str, int] | None = None) -> ModelInput:
        """`pending` maps a request id to its row among the previous step's samples, which the
        device still holds: its next input token is read from there, never from the host."""
        inp = cls([], [], [], [], [], [], 0, [], [], [], scored=[])
        for scheduled in batch:
            seq, start = scheduled.seq, scheduled.seq.num_computed_tokens
            end = start + scheduled.num_tokens
            known = seq.token_ids[start:end]
            if len(known) < scheduled.num_tokens:  # the one pending token, last of a decode
                inp.pending_rows.append(len(inp.input_ids) + len(known))
                inp.pending_src.append(pending[seq.rid])
                known = known + [0]
            inp.input_ids += known
            inp.positions += range(start, end)
            inp.slot_mapping += [seq.block_table[pos // block_size] * block_size + pos % block_size
                                 for pos in range(start, end)]
            inp.block_tables.append(seq.block_table)
            inp.context_lens.append(end)
            inp.query_lens.append(scheduled.num_tokens)
            inp.num_decodes += scheduled.num_tokens == 1
            first_row = len(inp.input_ids) - scheduled.num_tokens
            for pos in scheduled.scored_positions():
                inp.scored.append(len(inp.logits_indices))
                inp.logits_indices.append(first_row + pos - start)
            if scheduled.samples:
                inp.logits_indices.append(len(inp.input_ids) - 1)
        inp.greedy = not inp.scored and all(s.seq.plain_greedy for s in batch if s.samples)
        return inp

    @property
    def num_sampled(self) -> int:
        """Rows that sample a token (the rest of logits_indices score prompt tokens)."""
        return len(self.logits_indices) - len(self.scored or ())

    @property
    def samples_every_row(self) -> bool:
        """Every token row is sampled, in order (a pure decode batch): no row indices are needed."""
        return len(self.logits_indices) == len(self.input_ids)


@dataclass(frozen=True)
class StepLayout:
    """Where each field of one step lies in the packed int64 and int32 buffers (see the module doc).
    Every method returns a slice, for the host lists and the device buffers alike."""

    num_tokens: int
    num_seqs: int
    pad: int  # rows appended to every per-row field: a decode graph's bucket minus its batch
    table_width: int  # entries per block-table row: the longest table of the step
    num_pending: int
    num_sampled: int  # entries of the sampled-rows field; 0 when every row samples, in order
    query_info: bool  # query starts and lengths are packed: eager attention reads them, a decode graph does not

    @classmethod
    def of(cls, inp: ModelInput, padded_rows: int | None = None, query_info: bool = True) -> StepLayout:
        """The layout of `inp`, its per-row fields padded to `padded_rows` when given (one token per
        sequence only: a decode graph's batch)."""
        num_tokens = len(inp.input_ids)
        pad = 0 if padded_rows is None else padded_rows - num_tokens
        if pad and num_tokens != len(inp.context_lens):
            raise ValueError("only a batch of one token per sequence can be padded")
        return cls(num_tokens, len(inp.context_lens), pad, max(len(table) for table in inp.block_tables),
                   len(inp.pending_rows), 0 if inp.samples_every_row else len(inp.logits_indices), query_info)

    @classmethod
    def padding(cls, rows: int) -> StepLayout:
        """A batch of nothing but `rows` padding rows: the layout a decode graph is captured with."""
        return cls(0, 0, rows, 0, 0, 0, query_info=False)

    @staticmethod
    def capacity(rows: int, max_blocks: int, query_info: bool = False) -> tuple[int, int]:
        """(int64, int32) entries that hold any step of at most `rows` rows and `max_blocks` blocks a row."""
        return 6 * rows, (3 if query_info else 1) * rows + rows * max_blocks

    @property
    def rows(self) -> int:
        return self.num_tokens + self.pad

    @property
    def seq_rows(self) -> int:
        return self.num_seqs + self.pad

    # --- int64 ---------------------------------------------------------------------------------

    @property
    def input_ids(self) -> slice:
        return slice(0, self.rows)

    @property
    def positions(self) -> slice:
        return slice(self.rows, 2 * self.rows)

    @property
    def slot_mapping(self) -> slice:
        return slice(2 * self.rows, 3 * self.rows)

    @property
    def pending_rows(self) -> slice:
        start = 3 * self.rows
        return slice(start, start + self.num_pending)

    @property
    def pending_src(self) -> slice:
        start = 3 * self.rows + self.num_pending
        return slice(start, start + self.num_pending)

    @property
    def sampled_rows(self) -> slice:
        start = 3 * self.rows + 2 * self.num_pending
        return slice(start, start + self.num_sampled)

    # --- int32 ---------------------------------------------------------------------------------

    @property
    def context_lens(self) -> slice:
        return slice(0, self.seq_rows)

    @property
    def query_start(self) -> slice:
        start = self.seq_rows
        return slice(start, start + (self.num_seqs if self.query_info else 0))

    @property
    def query_lens(self) -> slice:
        start = self.query_start.stop
        return slice(start, start + (self.num_seqs if self.query_info else 0))

    @property
    def block_tables(self) -> slice:
        start = self.query_lens.stop
        return slice(start, start + self.num_seqs * self.table_width)

    # --- packing -------------------------------------------------------------------------------

    def pack(self, inp: ModelInput) -> tuple[list[int], list[int]]:
        """The int64 and int32 buffers' contents, in this layout. Padding rows hold token 0 at
        position 0, store no KV (slot -1) and have context length 0."""
        pad = [0] * self.pad
        longs = (inp.input_ids + pad + inp.positions + pad + inp.slot_mapping + [-1] * self.pad
                 + inp.pending_rows + inp.pending_src + (inp.logits_indices if self.num_sampled else []))
        ints = inp.context_lens + pad
        if self.query_info:
            starts = [0]
            for query_len in inp.query_lens[:-1]:
                starts.append(starts[-1] + query_len)
            ints += starts + inp.query_lens
        flat_tables, _ = flat_block_tables(inp.block_tables)
        return longs, ints + flat_tables


def flat_block_tables(tables: list[list[int]]) -> tuple[list[int], int]:
    """Block tables as one row-major list, each row padded with zeros to the longest: (list, width)."""
    width = max(len(table) for table in tables)
    return [block for table in tables for block in table + [0] * (width - len(table))], width


def copy_from_host(values: list[int], out: torch.Tensor) -> None:
    """out[:len(values)] = values in one asynchronous copy, from pinned memory on CUDA."""
    out[:len(values)].copy_(torch.tensor(values, dtype=out.dtype, pin_memory=out.is_cuda), non_blocking=True)


def to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new device tensor of `values`, copied asynchronously from pinned memory on CUDA."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def fill_pending(ids: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, sampled: torch.Tensor,
                 host_rows: list[int]) -> None:
    """ids[rows] = sampled[src]: input tokens that the step before sampled, taken on the device
    (`host_rows` is `rows` on the host). When they are the first rows in order (a decode batch), that
    is one gather, written in place."""
    if host_rows == list(range(len(host_rows))):
        torch.index_select(sampled, 0, src, out=ids[:src.numel()])
    else:
        ids[rows] = sampled[src]
