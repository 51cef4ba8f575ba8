"""Moving tokens between the natural order (B, H, N, D) and a branch's gathered layout (B * S, H_b, L, D).

A branch with segment ``w`` splits ``0..N-1`` into ``S = N // w`` whole segments and, if ``N % w``, one shorter
tail segment (a segment longer than N is all tail). Within a segment of length ``n``, head ``k`` of the branch
(offset ``o_k``) sees the tokens ``u = o_k + j * r`` for ``j < ceil((n - o_k) / r)``; the gathered layout puts
them in rows ``j = 0, 1, ...`` of batch entry ``b * S + s``. Rows past a head's count repeat a real token and are
masked out (`masks.py`): padding never enters a softmax. Index tensors depend only on (branch, n), not on N.
A tail may be gathered into as many rows as a whole segment (``pad_tail``): then every unit of a branch has the
same shape but its batch size, and one compiled kernel serves every N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from .masks import counts
from .spec import Branch


@dataclass(frozen=True)
class Unit:
    """``num_segments`` segments of length ``seglen``, the first starting at token ``first_segment * w``,
    gathered into ``rows`` rows per head (at least ``ceil(seglen / r)``)."""

    first_segment: int
    num_segments: int
    seglen: int
    rows: int


def units(branch: Branch, seq_len: int, pad_tail: bool) -> list[Unit]:
    """The whole segments of the branch as one unit and the tail segment, if any, as another."""
    w, r = branch.segment, branch.rate
    whole, tail = divmod(seq_len, w)
    out = [Unit(0, whole, w, -(-w // r))] if whole else []
    if tail:
        out.append(Unit(whole, 1, tail, -(-(w if pad_tail else tail) // r)))
    return out


def _rows(branch: Branch, unit: Unit, device: torch.device) -> torch.Tensor:
    """(H_b, rows): the segment position gathered into row j of head k (clamped inside the segment)."""
    seglen = unit.seglen
    j = torch.arange(unit.rows, device=device)
    c = torch.tensor(counts(branch, seglen), device=device)
    o = torch.tensor(branch.offsets, device=device)
    u = o[:, None] + torch.minimum(j[None, :], (c[:, None] - 1).clamp(min=0)) * branch.rate
    return u.clamp(max=seglen - 1)


def gather(x: torch.Tensor, branch: Branch, unit: Unit, heads: torch.Tensor) -> torch.Tensor:
    """(B, Hx, N, D) -> (B * num_segments, H_b, L, D); ``heads[k]`` is the head of ``x`` feeding head k."""
    B, _, _, D = x.shape
    start = unit.first_segment * branch.segment
    seg = rearrange(x.narrow(2, start, unit.num_segments * unit.seglen), "b h (s n) d -> b s h n d", s=unit.num_segments)
    rows = _rows(branch, unit, x.device)
    out = seg[:, :, heads[:, None], rows]  # (B, S, H_b, L, D)
    return out.reshape(B * unit.num_segments, len(branch.heads), -1, D)


def scatter_index(branch: Branch, unit: Unit, num_heads: int, device: torch.device):
    """For every (head h, segment position u): whether the branch covers it, and its flat row ``k * rows + j``."""
    L, seglen = unit.rows, unit.seglen
    covered = torch.zeros(num_heads, seglen, dtype=torch.bool, device=device)
    flat = torch.zeros(num_heads, seglen, dtype=torch.int64, device=device)
    u = torch.arange(seglen, device=device)
    for k, (h, o) in enumerate(zip(branch.heads, branch.offsets)):
        covered[h] = u % branch.rate == o
        flat[h] = k * L + torch.where(covered[h], u // branch.rate, 0)
    return covered, flat


def scatter(y: torch.Tensor, branch: Branch, unit: Unit, num_heads: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered rows (B * S, H_b, L, *E) back to natural order (B, H, S * n, *E), zero where not covered.

    Returns the natural-order tensor and the coverage mask (H, S * n) broadcastable against it.
    """
    covered, flat = scatter_index(branch, unit, num_heads, y.device)
    S = unit.num_segments
    rows = rearrange(y, "(b s) k j ... -> b s (k j) ...", s=S).index_select(2, flat.flatten())
    return rearrange(rows, "b s (h n) ... -> b h (s n) ...", h=num_heads), covered.repeat(1, S)
