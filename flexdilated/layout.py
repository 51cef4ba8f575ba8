"""Moving tokens between the natural order (B, H, N, D) and a branch's gathered layout (B * S, H_b, L, D).

A branch with segment ``w`` splits ``0..N-1`` into ``S = N // w`` whole segments and, if ``N % w``, one shorter
tail segment (a segment longer than N is all tail). Within a segment of length ``n``, head ``k`` of the branch
(offset ``o_k``) sees the tokens ``u = o_k + j * r`` for ``j < ceil((n - o_k) / r)``; the gathered layout puts
them in rows ``j = 0, 1, ...`` of batch entry ``b * S + s``. Rows past a head's count repeat real tokens and are
masked out (`masks.py`): padding never enters a softmax, and it is scattered back to a scratch slot.
A tail may be gathered into as many rows as a whole segment (``pad_tail``): then every unit of a branch has the
same shape but its batch size, and one compiled kernel serves every N. Gathers use (H_b, L) index tensors that
depend on the branch and the segment length only; the scatter back uses an (S, H_b, L) index.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from einops import rearrange

from .masks import counts
from .spec import Branch, traced_cache


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
    whole, tail = seq_len // w, seq_len % w
    out = [Unit(0, whole, w, -(-w // r))] if whole else []
    if tail:
        out.append(Unit(whole, 1, tail, -(-(w if pad_tail else tail) // r)))
    return out


@traced_cache(maxsize=1024)
def _positions(branch: Branch, seglen: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    j = torch.arange(rows)[None, :]
    count = torch.tensor(counts(branch, seglen))[:, None]
    # padding rows cycle through the head's real tokens (a head with none: through the segment), so that no token
    # repeats more than rows / count times: the backward of the gather accumulates the repeats of one index
    # serially on CUDA (a tail of 576 tokens gathered into 2048 rows cost 0.9 ms per gather, `perf/NOTES.md`)
    u = torch.where(count > 0, torch.tensor(branch.offsets)[:, None] + j % count.clamp(min=1) * branch.rate, j % seglen)
    return u.clamp(max=seglen - 1).to(device), (j < count).to(device)


def positions(branch: Branch, unit: Unit, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_b, rows) each: the position within its segment of gathered row j of head k (clamped into the segment),
    and whether that row holds a real token (``j < count_k``) rather than padding."""
    return _positions(branch, unit.seglen, unit.rows, device)


@traced_cache(maxsize=1024)
def head_index(branch: Branch, group: int, device: torch.device) -> torch.Tensor:
    """The heads of a tensor with ``H / group`` heads that feed the branch's heads (GQA: ``h // group``)."""
    return torch.tensor([h // group for h in branch.heads], device=device)


def segments(x: torch.Tensor, branch: Branch, unit: Unit) -> torch.Tensor:
    """The unit's tokens of ``x`` (B, H, N, *E) as a view (B, S, H, n, *E)."""
    start = unit.first_segment * branch.segment
    tokens = x.narrow(2, start, unit.num_segments * unit.seglen)
    return rearrange(tokens, "b h (s n) ... -> b s h n ...", s=unit.num_segments)


def gather(x: torch.Tensor, branch: Branch, unit: Unit, heads: torch.Tensor) -> torch.Tensor:
    """(B, Hx, N, *E) -> (B * S, H_b, rows, *E); ``heads[k]`` is the head of ``x`` feeding head k."""
    rows = segments(x, branch, unit)[:, :, heads[:, None], positions(branch, unit, x.device)[0]]
    return rows.flatten(0, 1)


def natural_index(branch: Branch, unit: Unit, scratch: int, device: torch.device) -> torch.Tensor:
    """(S, H_b, rows): the natural position of every gathered row, and ``scratch`` for padding rows.

    With a buffer one position longer than the sequence (``scratch = N``), scattering through this index is
    conflict-free: each position receives at most one row of the branch, and padding lands on the scratch slot.
    """
    pos, real = positions(branch, unit, device)
    start = (unit.first_segment + torch.arange(unit.num_segments, device=device)) * branch.segment
    return torch.where(real, start[:, None, None] + pos, scratch)
