"""One tensor-parallel rank: its shard of the model, its KV pool, and the forward pass.

Rank 0 (the driver) turns scheduled sequences into a `ModelInput` of plain lists, sends it to
the other ranks, and runs the same forward itself; the collectives inside the layers keep the
ranks in step. Only the driver receives logits.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tpfleet.attention.backend import AttentionMetadata, get_backend
from tpfleet.comm.group import TPGroup, init_tp_group
from tpfleet.config import EngineConfig
from tpfleet.engine.scheduler import ScheduledSeq
from tpfleet.model.config import ModelConfig, parse_dtype
from tpfleet.model.loader import load_weights
from tpfleet.model.qwen3 import Qwen3ForCausalLM

CPU_DEFAULT_KV_TOKENS = 65536


@dataclass
class ModelInput:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]
    query_lens: list[int]
    num_decodes: int
    logits_indices: list[int]  # token rows whose logits are sampled

    @classmethod
    def build(cls, batch: list[ScheduledSeq], block_size: int) -> "ModelInput":
        inp = cls([], [], [], [], [], [], 0, [])
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_tokens
            inp.input_ids += seq.token_ids[start:end]
            inp.positions += range(start, end)
            inp.slot_mapping += [seq.block_table[p // block_size] * block_size + p % block_size
                                 for p in range(start, end)]
            inp.block_tables.append(seq.block_table)
            inp.context_lens.append(end)
            inp.query_lens.append(s.num_tokens)
            inp.num_decodes += s.num_tokens == 1
            if s.samples:
                inp.logits_indices.append(len(inp.input_ids) - 1)
        return inp


class ModelRunner:
    def __init__(self, cfg: EngineConfig, rank: int, store_port: int, store: dist.TCPStore | None = None):
        self.cfg = cfg
        self.rank = rank
        self.device = torch.device(cfg.rank_device(rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.tp_size))
        self.model_config = ModelConfig.from_dir(cfg.model)
        self.dtype = self.model_config.dtype if cfg.dtype == "auto" else parse_dtype(cfg.dtype)
        self.tp: TPGroup = init_tp_group(rank, cfg.tp_size, self.device, "127.0.0.1", store_port, store, self.dtype,
                                         cfg.enable_custom_all_reduce, cfg.enable_symm_mem)
        self.timings: dict[str, float] = {}

        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        with torch.device(self.device):
            self.model = Qwen3ForCausalLM(self.model_config, self.tp, get_backend(cfg.attention_backend))
        torch.set_default_dtype(prev)
        load_weights(self.model, cfg.model, show_progress=rank == 0)
        self.timings["load_weights_s"] = time.perf_counter() - t0

        self.num_blocks = self._agree_on_num_blocks()
        self._allocate_kv_cache()

    # --- KV cache -----------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        attn = self.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_token * self.cfg.block_size * len(self.model.layers)

    def _agree_on_num_blocks(self) -> int:
        """Every rank must hold the same number of blocks: take the minimum over ranks."""
        if self.cfg.kv_cache_tokens is not None or self.device.type == "cpu":
            tokens = self.cfg.kv_cache_tokens or CPU_DEFAULT_KV_TOKENS
            n = -(-tokens // self.cfg.block_size)
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = free - (1.0 - self.cfg.mem_fraction_static) * total
            n = int(budget // self._bytes_per_block())
        if self.tp.world_size > 1:
            t = torch.tensor([n], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.pg)
            n = int(t.item())
        if n < 1:
            raise RuntimeError(f"rank {self.rank}: no GPU memory left for the KV cache after loading weights "
                               f"(mem_fraction_static={self.cfg.mem_fraction_static}); raise it or use more GPUs")
        return n

    def _allocate_kv_cache(self) -> None:
        attn = self.model.layers[0].self_attn
        shape = (2, len(self.model.layers), self.num_blocks, self.cfg.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]

    # --- forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, inp: ModelInput) -> torch.Tensor | None:
        dev = self.device

        def t(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype, device=dev)

        width = max(len(b) for b in inp.block_tables)
        tables = [b + [0] * (width - len(b)) for b in inp.block_tables]
        meta = AttentionMetadata(
            slot_mapping=t(inp.slot_mapping),
            block_tables=t(tables, torch.int32),
            context_lens=t(inp.context_lens, torch.int32),
            query_lens=inp.query_lens,
            context_lens_host=inp.context_lens,
            num_decodes=inp.num_decodes,
            block_size=self.cfg.block_size,
        )
        hidden = self.model(t(inp.input_ids), t(inp.positions), meta)
        logits = self.model.compute_logits(hidden[t(inp.logits_indices)]) if inp.logits_indices else None
        self.tp.check()
        return logits

    def shutdown(self) -> None:
        self.tp.destroy()
        del self.model, self.kv_cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
