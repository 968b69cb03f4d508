"""One tensor-parallel rank: its shard of the model, its KV pool, and the forward pass.

Rank 0 (the driver) turns scheduled sequences into a `ModelInput` of plain lists (step_input.py),
sends it to the other ranks, and runs the same forward itself; the collectives inside the layers
keep the ranks in step. Only the driver receives logits, except that a greedy batch-1 step on GPUs
picks its token on every rank without gathering them (the model's `greedy_token`); a step whose rows
want logprobs, penalties or prompt scores takes the regular path. Giving memory to a colocated trainer
and loading new weights in place is the business of `self.colocation`.

Memory (tpfleet.memory): each rank makes its saver right after choosing its device. The weights, the
KV cache (with the routing table) and the CUDA graphs are allocated in its regions; the communication
buffers never are, since they must stay exportable over IPC and resident: the TP group is set up
first, outside every region.

Routing replay (MoE, `enable_return_routed_experts`): the driver files each forward's experts per token
under the token's KV slot, so a sequence's routing is found through its block table, also for the
positions the prefix cache served (recorded when they were computed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from tpfleet import env
from tpfleet.attention.backend import AttentionMetadata, get_backend
from tpfleet.comm.group import TPGroup, init_tp_group
from tpfleet.config import EngineConfig
from tpfleet.devices import DeviceError, local_uuid
from tpfleet.engine.colocation import Colocation
from tpfleet.engine.cuda_graphs import capture as capture_graphs
from tpfleet.engine.sampler import SamplerOutput
from tpfleet.engine.step_input import ModelInput, StepLayout, fill_pending, to_device
from tpfleet.jit import STATS as JIT_STATS
from tpfleet.jit import track_triton
from tpfleet.memory import KV_CACHE, WEIGHTS, make_saver
from tpfleet.model.config import ModelConfig
from tpfleet.model.loader import init_random_weights, load_weights
from tpfleet.model.registry import build_model
from tpfleet.phases import report_phase

CPU_DEFAULT_KV_TOKENS = 65536


def jit_report(triton_tracked: bool) -> dict:
    """What start-up compiled, tuned or found cached, and the seconds it took: a cold start shows here."""
    return {"jit": JIT_STATS.report(),
            "triton_tracked": triton_tracked,  # False: this Triton cannot report its compilations
            "triton_cache": os.environ.get(env.TRITON_CACHE_DIR)}


def check_device(rank: int, device: torch.device, expected_uuid: str) -> None:
    """Fail fast when the device this rank opened is not the one the placement plan assigned."""
    actual = local_uuid(device.index)
    if actual != expected_uuid:
        raise DeviceError(f"rank {rank} opened {device} = {actual}, but the placement plan assigned "
                          f"{expected_uuid} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


class ModelRunner:
    def __init__(self, cfg: EngineConfig, rank: int, store_port: int, store: dist.TCPStore | None = None,
                 on_phase: Callable[[str], None] | None = None):
        """`on_phase` hears each start-up phase this rank reaches (rank 0 reports them to the log)."""
        self.cfg = cfg
        self.rank = rank
        self.on_phase = on_phase
        self.device = torch.device(cfg.rank_device(rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if cfg.gpu_uuids:
                check_device(rank, self.device, cfg.gpu_uuids[rank])
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.tp_size))
        self.saver = make_saver(self.device, cfg.enable_memory_saver, (WEIGHTS,) if cfg.weights_cpu_backup else ())
        if self.saver.enabled:
            # NCCL must not register saver memory for its graphs: a released range would stay registered
            os.environ.setdefault(env.NCCL_GRAPH_REGISTER, "0")
        self.num_graph_captures = 0
        self.model_config = ModelConfig.from_dir(cfg.model)
        max_pos = self.model_config.max_position_embeddings
        self.context_length = min(cfg.context_length or max_pos, max_pos)
        self.dtype = getattr(torch, self.model_config.dtype if cfg.dtype == "auto" else cfg.dtype)
        self.tp: TPGroup = init_tp_group(rank, cfg.tp_size, self.device, "127.0.0.1", store_port, store, self.dtype,
                                         cfg.enable_custom_all_reduce, cfg.enable_symm_mem)
        self.timings: dict[str, float] = {}
        self.sampled: torch.Tensor | None = None  # the last step's tokens, for the next step's pending inputs

        triton_tracked = self.device.type == "cuda" and track_triton()
        t0 = time.perf_counter()
        backend = get_backend(cfg.resolved_attention_backend)
        backend.check_head_dim(self.model_config.head_dim)
        torch.manual_seed(cfg.seed)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        with self.saver.region(WEIGHTS):
            with torch.device(self.device):
                self.model = build_model(self.model_config, self.tp, backend,
                                         ep_size=cfg.ep_size,
                                         max_num_tokens=max(cfg.max_num_batched_tokens, cfg.max_num_seqs))
            torch.set_default_dtype(prev)
            if cfg.load_format == "dummy":
                init_random_weights(self.model, cfg.seed + rank)
            else:
                load_weights(self.model, cfg.model, show_progress=rank == 0)
        self._buffers_out_of_weights()
        self.timings["load_weights_s"] = time.perf_counter() - t0
        self._reached("weights_loaded", seconds=round(self.timings["load_weights_s"], 2))

        self.num_blocks = self._agree_on_num_blocks()
        self.routed_by_slot: torch.Tensor | None = None  # [slots + 1, layers, top_k] int32; the last row: padding
        self.allocate_kv_cache()
        self._reached("kv_cache_allocated", blocks=self.num_blocks, tokens=self.num_blocks * cfg.block_size)
        self.decode_graphs = self.piecewise_graphs = None
        if cfg.resolved_graph_mode != "eager":
            self.capture_graphs()
        self._reached("jit_caches", **(jit_report(triton_tracked) if rank == 0 else {}))
        self.colocation = Colocation(self)

    def _reached(self, phase: str, **info) -> None:
        if self.rank == 0:
            report_phase(phase, **info)
        if self.on_phase is not None:
            self.on_phase(phase)

    def _buffers_out_of_weights(self) -> None:
        """Move the model's buffers (rotary tables) out of the weights region: released without a
        backup, the region comes back undefined, and a weight update restores parameters only."""
        if not self.saver.enabled:
            return
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module.register_buffer(name, buffer.clone(), persistent=name not in module._non_persistent_buffers_set)
        torch.cuda.empty_cache()  # the originals' blocks: cached in the weights pool, which nothing else can use

    @property
    def has_graphs(self) -> bool:
        return self.decode_graphs is not None

    @property
    def graph_memory_bytes(self) -> int:
        """What the graphs and their input buffers hold, as the driver saw each capture take it."""
        return sum(graphs.memory_bytes for graphs in (self.decode_graphs, self.piecewise_graphs) if graphs)

    def capture_graphs(self) -> None:
        """Capture (again, without the saver: the graphs hold the addresses of the weights and the KV
        cache they saw): the largest bucket of each kind now, the others on first use, unless
        `capture_all_graphs`."""
        cfg = self.cfg
        self.decode_graphs = self.piecewise_graphs = None  # free the old ones before capturing anew
        max_blocks = -(-self.context_length // cfg.block_size)
        self.decode_graphs, self.piecewise_graphs, stats = capture_graphs(
            self.model, self.device, cfg.block_size, min(cfg.max_num_seqs, 512), max_blocks,
            cfg.max_num_batched_tokens, cfg.resolved_graph_mode, self.saver, cfg.capture_all_graphs,
            show_progress=self.rank == 0)
        self.num_graph_captures += 1
        self.timings["graph_capture_s"] = stats["seconds"]
        self._reached("graphs_captured", **stats)

    # --- KV cache -----------------------------------------------------------------------------

    @property
    def records_routing(self) -> bool:
        """Whether this rank files each token's experts by KV slot (routing replay: the driver only)."""
        return self.cfg.enable_return_routed_experts and self.rank == 0 and self.model_config.is_moe

    @property
    def routing_row_bytes(self) -> int:
        """Bytes of one position's routing: an int32 per layer and chosen expert."""
        return 4 * self.model_config.num_hidden_layers * self.model_config.num_experts_per_tok

    def _bytes_per_block(self) -> int:
        """KV bytes of one block, plus its routing-replay rows where this rank records routing."""
        attn = self.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize * len(self.model.layers)
        if self.records_routing:
            per_token += self.routing_row_bytes
        return per_token * self.cfg.block_size

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

    def allocate_kv_cache(self) -> None:
        """The KV pool and, where this rank records routing, the experts-per-slot table."""
        attn = self.model.layers[0].self_attn
        shape = (2, len(self.model.layers), self.num_blocks, self.cfg.block_size, attn.num_kv_heads, attn.head_dim)
        with self.saver.region(KV_CACHE):
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.records_routing:
                num_slots = self.num_blocks * self.cfg.block_size
                routing = (num_slots + 1, self.model_config.num_hidden_layers, self.model_config.num_experts_per_tok)
                self.routed_by_slot = torch.full(routing, -1, dtype=torch.int32, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]

    def free_kv_cache(self) -> int:
        """Drop the KV cache and the routing table (the saver off); returns their size in bytes (0 when
        there was none)."""
        if self.kv_cache is None:
            return 0
        size = sum(t.numel() * t.element_size() for t in (self.kv_cache, self.routed_by_slot) if t is not None)
        self.kv_cache = self.routed_by_slot = None
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = torch.empty(0)
        return size

    # --- forward ------------------------------------------------------------------------------

    def _to_device(self, inp: ModelInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        """Every input of a step in two host-to-device copies (one per integer width), from pinned
        memory so they are asynchronous, rather than one synchronising copy per field. Pending input
        tokens are then filled in from the previous step's samples, device to device. Returns the
        input ids, the positions, the attention metadata and the rows that sample (None: every row)."""
        layout = StepLayout.of(inp)
        host_longs, host_ints = layout.pack(inp)
        longs = to_device(host_longs, torch.int64, self.device)
        ints = to_device(host_ints, torch.int32, self.device)
        ids = longs[layout.input_ids]
        if layout.num_pending:
            fill_pending(ids, longs[layout.pending_rows], longs[layout.pending_src], self.sampled, inp.pending_rows)
        meta = AttentionMetadata(
            slot_mapping=longs[layout.slot_mapping],
            block_tables=ints[layout.block_tables].view(layout.num_seqs, layout.table_width),
            context_lens=ints[layout.context_lens],
            query_lens=inp.query_lens,
            context_lens_host=inp.context_lens,
            num_decodes=inp.num_decodes,
            block_size=self.cfg.block_size,
            query_start=ints[layout.query_start],
            query_lens_dev=ints[layout.query_lens],
        )
        return ids, longs[layout.positions], meta, longs[layout.sampled_rows] if layout.num_sampled else None

    @torch.inference_mode()
    def run(self, inp: ModelInput,
            sampler: Callable[[torch.Tensor], SamplerOutput] | None = None) -> SamplerOutput | None:
        """One forward pass; on the driver, `sampler` turns the logits of `inp.logits_indices` into
        tokens and logprobs. Returns them, left on the device, or None when no logits were computed.
        Under the overlap schedule every rank keeps the tokens (the driver broadcasts its own), because
        the next step, launched before the host reads them, takes its pending input tokens from there."""
        num_seqs, logits_rows = len(inp.query_lens), None
        if self.decode_graphs is not None and inp.num_decodes == num_seqs and self.decode_graphs.can_run(num_seqs):
            hidden = self.decode_graphs.run(inp, self.sampled)  # stages its own inputs; the rows that sample
            slots = self.decode_graphs.staged_slots  # padded to the bucket, padding rows -1
        else:
            ids, positions, meta, logits_rows = self._to_device(inp)
            if self.piecewise_graphs is not None and self.piecewise_graphs.can_run(len(inp.input_ids)):
                hidden = self.piecewise_graphs.run(ids, positions, meta)
            else:
                hidden = self.model(ids, positions, meta)
            slots = meta.slot_mapping
        if self.routed_by_slot is not None:
            self._record_routing(slots)
        out = None
        if inp.logits_indices:
            rows = hidden if logits_rows is None else hidden[logits_rows]
            if inp.greedy and self.model.picks_greedy(len(inp.input_ids)):
                out = SamplerOutput(self.model.greedy_token(rows))  # on every rank: nothing to broadcast
            else:
                out = self._sample(rows, sampler, inp.num_sampled)
            if self.cfg.overlap_schedule:
                self.sampled = out.tokens
        self.tp.check()
        return out

    def _sample(self, rows: torch.Tensor, sampler: Callable[[torch.Tensor], SamplerOutput] | None,
                n: int) -> SamplerOutput:
        """The driver samples from the gathered logits; under the overlap schedule it broadcasts the n
        tokens, which the other ranks need for the next step's inputs."""
        logits = self.model.compute_logits(rows)
        out = sampler(logits) if sampler is not None and logits is not None else None
        if out is None:
            out = SamplerOutput(torch.empty(n, dtype=torch.int64, device=self.device))
        if self.cfg.overlap_schedule and self.tp.world_size > 1 and n:
            self.tp.broadcast_from_driver(out.tokens)
        return out

    def _record_routing(self, slots: torch.Tensor) -> None:
        """File the last forward's experts per token under its KV slot; padding rows (slot -1) go to the
        spare last row. No host round trip: a step's rows are written in the stream's order."""
        routed = self.model.routed_experts_buffer[:slots.shape[0]]
        spare = self.routed_by_slot.shape[0] - 1
        self.routed_by_slot.index_copy_(0, torch.where(slots < 0, spare, slots), routed)

    def routed_experts(self, block_table: list[int], num_positions: int) -> bytes:
        """The experts of positions 0 .. num_positions-1 of a sequence with this block table:
        little-endian int32, C order, [num_positions, layers, top_k]."""
        bs = self.cfg.block_size
        slots = [block_table[pos // bs] * bs + pos % bs for pos in range(num_positions)]
        rows = self.routed_by_slot[torch.tensor(slots, dtype=torch.long, device=self.device)]
        return rows.cpu().numpy().astype("<i4", copy=False).tobytes(order="C")

    def shutdown(self) -> None:
        self.decode_graphs = self.piecewise_graphs = self.colocation = None
        self.tp.destroy()
        self.model = self.kv_cache = self.routed_by_slot = None
        self.saver = None  # after every tensor of its regions
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
