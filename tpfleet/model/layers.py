"""Tensor-parallel building blocks. Each parameter knows how to load its own shard (`weight_loader`),
so the checkpoint loader stays a plain loop over tensors.

Column-parallel layers split the output features across ranks and need no communication;
row-parallel layers split the input features and sum partial outputs with one all-reduce.
A column-parallel layer followed by a row-parallel one (qkv -> o, gate_up -> down) costs one
all-reduce per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpfleet.comm.group import TPGroup
from tpfleet.kernels.fused_ar import Exchange

try:  # fused kernels for CUDA tensors; CPU-only installs may lack Triton and use the torch code
    from tpfleet.kernels import gemm, gemv, greedy, ops
except ImportError:
    gemm = gemv = greedy = ops = None


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


def _param(*shape: int, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader
    return p


def skinny_or_cublas(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                     silu_mul: bool = False) -> torch.Tensor:
    """x @ weight.T: a few rows on a GPU whose sweep found tpfleet's skinny GEMM faster for this shape go
    to it (tpfleet.kernels.gemm), everything else to torch (cuBLAS). With `silu_mul` (weight = [gate;
    up]) the result is silu(gate) * up, which the skinny GEMM writes in place of its products."""
    config = gemm.chosen(x, weight, silu_mul) if gemm is not None else None
    if config is not None:
        return gemm.linear(x, weight, config, out, silu_mul)
    if silu_mul:
        return silu_and_mul(F.linear(x, weight))
    return F.linear(x, weight) if out is None else torch.matmul(x, weight.t(), out=out)


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False):
        super().__init__()
        self.tp = tp
        self.out_per_rank = divide(out_features, tp.world_size, "output features")
        self.weight = _param(self.out_per_rank, in_features, loader=self.load_weight)
        self.bias = _param(self.out_per_rank, loader=self.load_weight) if bias else None

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, self.tp.rank * self.out_per_rank, self.out_per_rank))

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """With `silu_mul` (an MLP's gate_up), silu(gate) * up of the product."""
        if self.bias is None:
            return skinny_or_cublas(x, self.weight, silu_mul=silu_mul)
        y = F.linear(x, self.weight, self.bias)
        return silu_and_mul(y) if silu_mul else y

    def one_gemv(self, x: torch.Tensor) -> bool:
        """Whether this projection of x is a batch-1 GEMV, which takes the norm before it as its prologue."""
        return self.bias is None and gemv is not None and gemv.supports(x, self.weight)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
        """This projection of norm(x + residual), and the new residual (x itself without one). One row
        on GPU (batch-1 decode) takes one kernel, the norm being the GEMV's prologue."""
        if self.one_gemv(x):
            return gemv.norm_linear(x, residual, norm.weight, norm.eps, self.weight)
        h, residual = norm(x, residual) if residual is not None else (norm(x), x)
        return self(h), residual


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one GEMM (gate and up of the MLP)."""

    def __init__(self, in_features: int, out_sizes: list[int], tp: TPGroup, bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), tp, bias)

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.out_sizes[shard_id] // self.tp.world_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp.world_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one GEMM. When there are fewer kv heads than ranks, kv heads are replicated."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, tp: TPGroup, bias: bool):
        n = tp.world_size
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, n, "num_attention_heads")
        if num_kv_heads >= n:
            self.num_kv_heads = divide(num_kv_heads, n, "num_key_value_heads")
        else:
            divide(n, num_kv_heads, "tensor-parallel size over num_key_value_heads")
            self.num_kv_heads = 1
        self.kv_replicas = max(1, n // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * n
        super().__init__(hidden, out, tp, bias)

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp.rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp.rank // self.kv_replicas) * kv_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False):
        super().__init__()
        self.tp = tp
        self.site = 0  # its all-reduce's site when fused (tpfleet.model.ar_sites): set by the model
        self.in_per_rank = divide(in_features, tp.world_size, "input features")
        self.weight = _param(out_features, self.in_per_rank, loader=self.load_weight)
        self.bias = _param(out_features, loader=self.load_bias) if bias else None

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.in_per_rank, self.in_per_rank))

    def load_bias(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor, silu_mul: bool = False, fused: Exchange | None = None) -> torch.Tensor:
        """With `silu_mul`, x is [gate | up] and the product is of silu(gate) * up (the MLP's down
        projection); for one row on GPU the GEMV applies it as it loads x. With `fused` (batch-1
        decode, TP > 1, the model having checked that the shapes fit) the GEMV all-reduces its own
        output, each block its own slice (tpfleet.kernels.fused_ar)."""
        if fused is not None:
            launch = gemv.silu_mul_linear if silu_mul else gemv.linear
            return launch(x, self.weight, all_reduce=(fused, self.site))
        out = self.tp.input_buffer((x.shape[0], self.weight.shape[0]), x.dtype) if x.dim() == 2 else None
        if gemv is not None and gemv.supports(x, self.weight):
            y = gemv.silu_mul_linear(x, self.weight, out) if silu_mul else gemv.linear(x, self.weight, out)
        else:
            y = skinny_or_cublas(silu_and_mul(x) if silu_mul else x, self.weight, out)
        y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows split across ranks; the vocabulary is padded up so any size splits (151936 or 1001 alike)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.rows_per_rank
        self.end = min(self.start + self.rows_per_rank, vocab_size)
        self.weight = _param(self.rows_per_rank, hidden, loader=self.load_weight)
        # Its exchange's site when fused (tpfleet.model.ar_sites), set by the model: the embedding's
        # all-reduce, or the LM head's greedy token
        self.site = 0

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n = self.end - self.start
        param.data.zero_()
        param.data[:n].copy_(loaded[self.start:self.end])

    def forward(self, ids: torch.Tensor, fused: Exchange | None = None) -> torch.Tensor:
        """With `fused` (batch-1 decode on GPU, TP > 1) one kernel looks the row up and all-reduces it."""
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        if fused is not None:
            return ops.embedding_all_reduce(ids, self.weight, self.start, self.end, fused, self.site)
        mine = (ids >= self.start) & (ids < self.end)
        y = F.embedding((ids - self.start) * mine, self.weight) * mine.unsqueeze(-1)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__(vocab_size, hidden, tp)
        self.scratch = None  # the greedy kernel's, made by the first greedy step on its device

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0 (None elsewhere): only the driver samples."""
        logits = self.tp.gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size] if logits is not None else None

    def greedy(self, hidden: torch.Tensor, fused: Exchange | None) -> torch.Tensor:
        """The argmax token of one row on GPU, on every rank: each reduces its own shard (its padding
        left out), and at TP > 1 the ranks agree through `fused` (tpfleet.kernels.greedy)."""
        logits = F.linear(hidden, self.weight)[..., : self.end - self.start]
        if self.scratch is None:
            self.scratch = greedy.GreedyScratch(self.end - self.start, hidden.device)
        return greedy.greedy_token(logits, self.start, self.scratch, fused, self.site)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, loader=lambda p, w: p.data.copy_(w))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, adds it first and returns (normed, new_residual): the pre-norm block pattern.
        On GPU one fused kernel; the torch code below is its reference."""
        if x.is_cuda:
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype) * self.weight
        return y if residual is None else (y, residual)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves), as Qwen3 uses; cos/sin precomputed for every position."""

    def __init__(self, head_dim: int, max_position: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(-2)
        sin = self.sin[positions].unsqueeze(-2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
