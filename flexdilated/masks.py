"""Mask functions of one branch in its gathered layout, and the block masks built from them.

A branch's tokens are gathered per segment (`layout.py`): row ``j`` of head ``k`` holds the token at
``u = o_k + j * r`` of its segment, so the dilated pattern becomes a dense square ``j < count_k`` that is made of
whole blocks whenever ``w / r`` is a multiple of the block size. The block mask depends only on the branch and
the segment length, never on the sequence length N (segments are folded into the batch dimension).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from .spec import Branch, traced_cache

BLOCK_SIZE = 128
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def counts(branch: Branch, seglen: int) -> list[int]:
    """Tokens of a segment of length ``seglen`` that each head of the branch sees: ``ceil((seglen - o) / r)``."""
    return [max(0, -(-(seglen - o) // branch.rate)) for o in branch.offsets]


def branch_mask_mod(
    branch: Branch,
    seglen: int,
    causal: bool,
    device: torch.device,
    first_segment: int = 0,
    num_segments: int = 1,
    batch_start: int = 0,
    exclusions: bool = True,
) -> MaskMod:
    """``mask_mod(b, k, i, j)`` of the branch's gathered layout, pure index arithmetic:

        keep = i < count_k  and  j < count_k  and  (j <= i  or  not causal)
               and not (some earlier pattern e reaches (p, t))           # overlap="set" only

    with ``p = s*w + o_k + i*r``, ``t = s*w + o_k + j*r`` and segment
    ``s = first_segment + (batch_start + b) % num_segments``.
    Pattern e reaches (p, t) iff ``p // w_e == t // w_e`` and ``(p % w_e) % r_e == o_e == (t % w_e) % r_e``.
    """
    def const(x: int) -> torch.Tensor:  # 0-d tensors, not Python ints: one kernel serves every branch (SPEC §3)
        return torch.tensor(x, dtype=torch.int32, device=device)

    is_causal = torch.tensor(causal, device=device)
    count = torch.tensor(counts(branch, seglen), dtype=torch.int32, device=device)
    offset = torch.tensor(branch.offsets, dtype=torch.int32, device=device)
    earlier = [
        (const(w_e), const(r_e), torch.tensor(o_e, dtype=torch.int32, device=device))
        for w_e, r_e, o_e in (branch.earlier if exclusions else ())
    ]
    w, r = const(branch.segment), const(branch.rate)
    nested = branch.nested
    seg0, nseg, b0 = (
        torch.tensor(x, dtype=torch.int64, device=device)
        for x in (first_segment, num_segments, batch_start)
    )

    def mask_mod(b, k, i, j):
        c = count[k]
        keep = (i < c) & (j < c) & ((j <= i) | ~is_causal)
        if earlier:
            p = offset[k] + i * r
            t = offset[k] + j * r
            if not nested:  # segments of an earlier pattern straddle ours: use the absolute positions
                start = (seg0 + (b0 + b) % nseg) * w
                p, t = p + start, t + start
            for w_e, r_e, o_e in earlier:
                o = o_e[k]
                keep = keep & ~((p // w_e == t // w_e) & ((p % w_e) % r_e == o) & ((t % w_e) % r_e == o))
        return keep

    return mask_mod


def _first_true(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the number of True entries and their column indices listed first (flex's block table).

    Contiguous whatever the layout of ``x``: flex's kernels index the tables as if they were ("Q_IDX and Q_NUM_BLKS
    are always contiguous", flex_backwards.py.jinja); argsort of a transposed ``x`` is not, and gave wrong dk, dv."""
    num = x.sum(-1, dtype=torch.int32).contiguous()
    idx = torch.argsort(x.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
    return num, idx


def block_tables(
    mask_mod: MaskMod, heads: int, q_len: int, kv_len: int, device: torch.device, block: int, full_blocks: bool = True
):
    """Flex's partial and full block tables (1, H, ...) of ``mask_mod(0, h, i, j)`` on ``q_len`` x ``kv_len``
    (`block_matrices` as lists of block indices)."""
    partial, full = block_matrices(mask_mod, heads, q_len, kv_len, device, block, full_blocks)
    return (*_first_true(partial), *_first_true(full))


def block_matrices(
    mask_mod: MaskMod, heads: int, q_len: int, kv_len: int, device: torch.device, block: int, full_blocks: bool = True
):
    """Which blocks of ``mask_mod(0, h, i, j)`` on ``q_len`` x ``kv_len`` are partial and which full: dense bool
    (1, H, q blocks, kv blocks) each.

    The mask is evaluated one row of query blocks at a time: O(H * block * kv_len) memory, never (H, q_len,
    kv_len); indices past the ends are clamped (the mask_mod may index tables with them) and count as masked.
    With ``full_blocks=False`` every block the mask touches is partial (the mask_mod then decides element-wise).
    """
    nq, nk = -(-q_len // block), -(-kv_len // block)
    h = torch.arange(heads, device=device)[:, None, None]
    cols = torch.arange(nk * block, device=device)
    b0 = torch.zeros((), dtype=torch.int64, device=device)
    any_rows, all_rows = [], []
    for qb in range(nq):
        i = torch.arange(qb * block, (qb + 1) * block, device=device)
        keep = mask_mod(b0, h, i.clamp(max=q_len - 1)[None, :, None], cols.clamp(max=kv_len - 1)[None, None, :])
        inside = ((i[:, None] < q_len) & (cols[None, :] < kv_len)).view(1, block, nk, block)
        keep = keep.view(-1, block, nk, block)
        any_rows.append((keep & inside).any(dim=3).any(dim=1))
        all_rows.append((keep | ~inside).all(dim=3).all(dim=1))
    any_ = torch.stack(any_rows, dim=1)
    full = torch.stack(all_rows, dim=1) & any_ if full_blocks else torch.zeros_like(any_)
    return (any_ & ~full)[None], full[None]


@traced_cache(maxsize=512)
def _block_matrices(branch: Branch, seglen: int, rows: int, causal: bool, device: torch.device, block: int):
    """Partial and full blocks (dense, `block_matrices`) of the branch on a segment of length ``seglen`` gathered
    into ``rows`` rows.

    If the set-exclusion varies by segment (``not branch.nested``) it is left to the mask_mod, element-wise:
    every block it might touch is marked partial.
    """
    mask_mod = branch_mask_mod(branch, seglen, causal, device, exclusions=branch.nested)
    return block_matrices(mask_mod, len(branch.heads), rows, rows, device, block, full_blocks=branch.nested)


@traced_cache(maxsize=512)
def _block_tables(branch: Branch, seglen: int, rows: int, causal: bool, device: torch.device, block: int):
    """`_block_matrices` as flex's block tables: partial and full, (1, H, ...) each."""
    partial, full = _block_matrices(branch, seglen, rows, causal, device, block)
    return (*_first_true(partial), *_first_true(full))


@traced_cache(maxsize=512)
def _cached_block_mask(branch: Branch, seglen: int, rows: int, causal: bool, device: torch.device, block: int):
    mask_mod = branch_mask_mod(branch, seglen, causal, device)
    tables = _block_tables(branch, seglen, rows, causal, device, block)
    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(rows, rows))


def branch_block_mask(
    branch: Branch,
    seglen: int,
    rows: int,
    causal: bool,
    device: torch.device,
    first_segment: int = 0,
    num_segments: int = 1,
    batch_start: int = 0,
    block: int = BLOCK_SIZE,
) -> BlockMask:
    """The BlockMask of a branch over segments of length ``seglen`` gathered into ``rows`` rows (cached;
    independent of N).

    ``first_segment``, ``num_segments`` and ``batch_start`` matter only when ``branch.nested`` is False: then the
    mask_mod needs the absolute segment index and the mask is rebuilt around the cached block tables each call.
    """
    if branch.nested:
        return _cached_block_mask(branch, seglen, rows, causal, device, block)
    mask_mod = branch_mask_mod(branch, seglen, causal, device, first_segment, num_segments, batch_start)
    tables = _block_tables(branch, seglen, rows, causal, device, block)
    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(rows, rows))
