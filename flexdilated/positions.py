"""Rotary position embedding (RoPE) and its XPOS variant, applied to q and k from the true token positions.

RoPE rotates each pair of channels ``(x_2i, x_2i+1)`` of the token at position n by the angle ``n * θ_i`` with
``θ_i = base^(-2i/d)``, so ``<q_p, k_t>`` depends on ``p - t`` only. XPOS (Sun et al., 2022; the LongNet LM) also
scales q by ``ζ_i^(n/s)`` and k by ``ζ_i^(-n/s)`` with ``ζ_i = (2i/d + 0.4) / 1.4``, a decay in ``p - t``.
Positions are absolute (pass ``offset`` when decoding one token at a time), so the result does not depend on the
order tokens are processed in. XPOS scales grow as ``ζ^(-n/s)`` (ζ ≥ 0.29): in float32 they overflow past
n ≈ 70·s, about 36k tokens at s = 512, so long-sequence models use plain RoPE.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """``forward(q, k, offset=0)`` on (B, H, N, D) tensors (D even): rotated (and with ``xpos`` scaled) q and k
    for positions ``offset .. offset + N - 1``."""

    def __init__(self, head_dim: int, *, base: float = 10000.0, xpos: bool = False, scale_base: float = 512.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
        self.head_dim, self.base, self.xpos, self.scale_base = head_dim, base, xpos, scale_base

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` (B, N), if given, replaces ``offset .. offset + N - 1`` (packed documents: each token's
        position within its document)."""
        # in float64 whatever the model's dtype (no buffers for .half() to round): exact for very long sequences
        i = torch.arange(0, self.head_dim, 2, device=q.device, dtype=torch.float64)
        if positions is None:
            n = torch.arange(offset, offset + q.shape[-2], device=q.device, dtype=torch.float64)[:, None]
        else:
            n = positions.to(torch.float64)[:, None, :, None]  # (B, 1, N, 1)
        angle = n * self.base ** (-i / self.head_dim)  # (N, D/2)
        cos, sin = angle.cos(), angle.sin()
        if self.xpos:
            scale = ((i / self.head_dim + 0.4) / 1.4) ** (n / self.scale_base)
            return _rotate(q, cos * scale, sin * scale), _rotate(k, cos / scale, sin / scale)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_2i, x_2i+1) by the angle whose (scaled) cosine and sine are given, (N, D/2)."""
    # pairs by unflatten, not x[..., 1::2]: that slice's gradient is what Triton miscompiled in static graphs
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (`strided._every`, `perf/NOTES.md` attempt 20)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
