"""Colocation with a trainer on the same GPUs: give device memory back, take it again, load new weights.

Each rank's `ModelRunner` owns a `Colocation`; the driver reaches every rank's at once through
`RankGroup.call_all("colocation.<method>", ...)`, and each method answers with a per-rank report.
Weight updates are `self.weights` (tpfleet.engine.weight_updates), reached as "colocation.weights.<method>".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tpfleet.engine.weight_updates import RankWeights

if TYPE_CHECKING:
    from tpfleet.engine.model_runner import ModelRunner


class Colocation:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.weights = RankWeights(runner)

    @property
    def _on_gpu(self) -> bool:
        return self.runner.device.type == "cuda"

    def _device_free(self) -> int:
        return torch.cuda.mem_get_info(self.runner.device)[0] if self._on_gpu else 0

    def release_memory(self, tags: list[str]) -> dict:
        """Drop the KV cache and/or move weights to host memory; report what was actually freed."""
        runner = self.runner
        free_before = self._device_free()
        released = 0
        if "kv_cache" in tags:
            released += runner.free_kv_cache()
        if "weights" in tags and self._on_gpu:
            released += sum(param.numel() * param.element_size() for param in runner.model.parameters())
            runner.model.to("cpu")
        if self._on_gpu:
            torch.cuda.synchronize(runner.device)
            torch.cuda.empty_cache()
        return {"rank": runner.rank, "released_tensor_bytes": released,
                "device_freed_bytes": self._device_free() - free_before}

    def resume_memory(self, tags: list[str]) -> dict:
        runner = self.runner
        free_before = self._device_free()
        if "weights" in tags and self._on_gpu:
            runner.model.to(runner.device)
        if "kv_cache" in tags and runner.kv_cache is None:
            runner.allocate_kv_cache()
        if runner.has_graphs:
            runner.capture_graphs()  # the graphs point at the old addresses of weights and KV cache
        return {"rank": runner.rank, "device_taken_bytes": free_before - self._device_free()}
