"""Colocation with a trainer on the same GPUs: give device memory back, take it again, load new weights.

Each rank's `ModelRunner` owns a `Colocation`; the driver reaches every rank's at once through
`RankGroup.call_all("colocation.<method>", ...)`, and each method answers with a per-rank report.
Weight updates are `self.weights` (tpfleet.engine.weight_updates), reached as "colocation.weights.<method>".

With the memory saver on (tpfleet.memory), a release unmaps the tags' memory without copying it and a
resume maps it back at the same addresses: graphs replay as captured, and weights released without a
host backup come back undefined until the next weight update. With it off (and always on the CPU), the
KV cache is dropped and allocated anew, weights wait in pinned host memory, and the graphs, which hold
the old addresses, are dropped at the release and captured again once everything is back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tpfleet.engine.weight_updates import RankWeights
from tpfleet.memory import CUDA_GRAPH, KV_CACHE, TAGS, WEIGHTS

if TYPE_CHECKING:
    from tpfleet.engine.model_runner import ModelRunner


class Colocation:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.weights = RankWeights(runner)
        self.host_weights: list[tuple[nn.Parameter, torch.Tensor]] = []  # saver off: the weights while released
        self.graphs_dropped = False

    @property
    def _on_gpu(self) -> bool:
        return self.runner.device.type == "cuda"

    def _device_free(self) -> int:
        if not self._on_gpu:
            return 0
        torch.cuda.synchronize(self.runner.device)
        return torch.cuda.mem_get_info(self.runner.device)[0]

    def release_memory(self, tags: list[str]) -> dict:
        """Give the tags' device memory back (tags already released are skipped); report the bytes per
        tag and what the driver shows freed. The engine must be quiet: no step in flight."""
        saver = self.runner.saver
        todo = [tag for tag in TAGS if tag in tags and tag not in saver.released]
        free_before = self._device_free()
        per_tag = dict.fromkeys(TAGS, 0)
        if saver.enabled:
            per_tag.update(saver.release(todo))
        else:
            per_tag.update(self._release_without_saver(todo))
            saver.release(todo)  # the same tag bookkeeping: a released tag takes no allocation
        if self._on_gpu:
            torch.cuda.empty_cache()
        return {"rank": self.runner.rank, "released_tensor_bytes": sum(per_tag.values()), "bytes_per_tag": per_tag,
                "device_freed_bytes": self._device_free() - free_before}

    def resume_memory(self, tags: list[str]) -> dict:
        """Take the tags' memory again. With the saver, at the same addresses and without re-capture;
        `weights_defined` says whether the weights hold values (False: released without a backup)."""
        runner, saver = self.runner, self.runner.saver
        todo = [tag for tag in TAGS if tag in tags and tag in saver.released]
        free_before = self._device_free()
        per_tag = dict.fromkeys(TAGS, 0)
        per_tag.update(saver.resume(todo))
        if not saver.enabled:
            per_tag.update(self._resume_without_saver(todo))
        weights_defined = not (saver.enabled and WEIGHTS in todo and WEIGHTS not in saver.cpu_backup)
        return {"rank": runner.rank, "device_taken_bytes": free_before - self._device_free(),
                "bytes_per_tag": per_tag, "weights_defined": weights_defined,
                "graph_captures": runner.num_graph_captures}

    # --- the saver off ------------------------------------------------------------------------------------

    def _release_without_saver(self, tags: list[str]) -> dict[str, int]:
        runner, per_tag = self.runner, {}
        if tags and runner.has_graphs:  # they point at memory that is about to go
            per_tag[CUDA_GRAPH] = runner.graph_memory_bytes
            runner.decode_graphs = runner.piecewise_graphs = None
            self.graphs_dropped = True
        if KV_CACHE in tags:
            per_tag[KV_CACHE] = runner.free_kv_cache()
        if WEIGHTS in tags and self._on_gpu:
            per_tag[WEIGHTS] = self._weights_to_host()
        return per_tag

    def _resume_without_saver(self, tags: list[str]) -> dict[str, int]:
        runner, per_tag = self.runner, {}
        if WEIGHTS in tags and self.host_weights:
            per_tag[WEIGHTS] = self._weights_to_device()
        if KV_CACHE in tags and runner.kv_cache is None:
            runner.allocate_kv_cache()
            per_tag[KV_CACHE] = runner.kv_cache.numel() * runner.kv_cache.element_size()
        if self.graphs_dropped and not runner.saver.released:
            runner.capture_graphs()
            self.graphs_dropped = False
            per_tag[CUDA_GRAPH] = runner.graph_memory_bytes
        return per_tag

    def _weights_to_host(self) -> int:
        """Copy every parameter into pinned host memory (one synchronisation for all), then let its device
        storage go. Buffers (rotary tables) are small and stay."""
        params = list(self.runner.model.parameters())
        self.host_weights = []
        for param in params:
            host = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
            host.copy_(param.data, non_blocking=True)
            self.host_weights.append((param, host))
        torch.cuda.synchronize(self.runner.device)
        for param in params:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        return sum(host.numel() * host.element_size() for _, host in self.host_weights)

    def _weights_to_device(self) -> int:
        device = self.runner.device
        for param, host in self.host_weights:
            param.data = torch.empty(host.shape, dtype=host.dtype, device=device)
            param.data.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        size = sum(host.numel() * host.element_size() for _, host in self.host_weights)
        self.host_weights = []
        return size
