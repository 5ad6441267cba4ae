"""Building blocks shared by the model families: linear, norms, activations, rotary tables."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ember.engine.model.spec import RopeSpec

# Up to this many rows, a CPU matrix-vector product runs as a 2-way batched matmul
# over halves of the weight: here torch's GEMV for [1, k] x [n, k]^T is
# single-threaded (about 12 GB/s of weight reads), while bmm uses both cores and
# reaches the memory's streaming bandwidth (about 30 GB/s). Weights stay zero-copy views.
SMALL_BATCH_ROWS = 8


class Linear:
    """y = x @ weight^T (+ bias) over a zero-copy weight view. On CPU, inputs of up to
    SMALL_BATCH_ROWS rows run as a bmm over the weight's two halves (see above)."""

    __slots__ = ("bias", "halves", "weight")

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        out, inp = weight.shape
        split = weight.device.type == "cpu" and out % 2 == 0 and weight.is_contiguous()
        self.halves = weight.view(2, out // 2, inp) if split else None  # a view, not a copy

    def __call__(self, x: Tensor, cols: Tensor | None = None) -> Tensor:
        """x: [T, in] -> [T, out]. `cols`: columns(x), when several layers share x."""
        rows = x.shape[0]
        if self.halves is None or rows > SMALL_BATCH_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = torch.bmm(self.halves, columns(x) if cols is None else cols)  # [2, out/2, T]
        y = y.view(1, -1) if rows == 1 else y.view(-1, rows).t().contiguous()
        return y if self.bias is None else y + self.bias


def adjacent(*tensors: Tensor) -> Tensor | None:
    """The tensors [n_i, k] as one [sum n_i, k] view when they lie back to back in one
    storage (the store writes q, k, v and gate, up that way when their sizes are page
    multiples), else None. No copy: one matrix product then serves several weights."""
    first = tensors[0]
    if first.dim() != 2 or not all(t.is_contiguous() for t in tensors):
        return None
    end = first.storage_offset()
    for t in tensors:
        same_storage = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if (
            not same_storage
            or t.dtype != first.dtype
            or t.shape[1] != first.shape[1]
            or t.storage_offset() != end
        ):
            return None
        end += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def columns(x: Tensor) -> Tensor:
    """x [T, in] as the right operand of Linear's bmm: [2, in, T] (a view)."""
    return x.t().unsqueeze(0).expand(2, -1, -1)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x: [T, in] @ weight [out, in]^T (+ bias) -> [T, out], for one-off weights."""
    return Linear(weight, bias)(x)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama RMSNorm, computed in (at least) float32 as the reference does. x: [T, hidden]."""
    if x.dtype in (torch.float32, torch.float64):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * (xf * scale).to(x.dtype)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation a config names (spec.py lists the supported ones)."""
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


def inverse_frequencies(rope: RopeSpec, dim: int) -> Tensor:
    """[dim / 2] float32 inverse frequencies, scaled as `rope.kind` says."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class RotaryTable:
    """cos and signed sin per position, [positions, head_dim], grown on demand so a
    model with a 128k context does not pay for the whole table at start-up."""

    def __init__(self, rope: RopeSpec, head_dim: int, max_positions: int, dtype: torch.dtype) -> None:
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self.max_positions = max_positions
        self.dtype = dtype
        self.cos = torch.empty(0, head_dim, dtype=dtype)
        self.sin = torch.empty(0, head_dim, dtype=dtype)

    def lookup(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, signed sin for positions [T] -> each [T, 1, head_dim]."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0] or self.cos.device != positions.device:
            self._grow(max(needed, min(2 * self.cos.shape[0], self.max_positions), 256), positions.device)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def _grow(self, n: int, device: torch.device) -> None:
        # float32 angles as the reference computes them, then the model's dtype
        inv = self.inv_freq.to(device)
        freqs = torch.arange(n, device=device).float()[:, None] * inv[None, :]
        self.cos = torch.cat((freqs, freqs), dim=-1).cos().to(self.dtype)
        sin = freqs.sin()
        self.sin = torch.cat((-sin, sin), dim=-1).to(self.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x: [T, heads, d]; cos, sin: [T, 1, d] (sin signed: -sin on the
    first half), so rotate_half(x) * sin == roll(x, d/2) * signed_sin."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), sin)
