"""Packed documents: ``document_ids`` (B, N), non-decreasing along N, several documents in one row (SPEC §1).

The result equals running each document alone: positions, segments, head offsets and causality counted from the
document's first token, and no key of another document — the promise of FlashAttention's varlen and of flex
document masks for dense attention. The route does exactly that: each document of each row is one call of the
single-sequence dispatch (`attention.routed_attention`), so no work crosses a boundary.
"""

from __future__ import annotations

from typing import Callable

import torch


def check_document_ids(ids: torch.Tensor, batch: int, seq_len: int, device: torch.device) -> None:
    dtype = getattr(ids, "dtype", None)
    if not isinstance(ids, torch.Tensor) or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(
            f"document_ids must be an integer tensor (B, N), got {getattr(ids, 'dtype', type(ids).__name__)}"
        )
    if tuple(ids.shape) != (batch, seq_len):
        raise ValueError(f"document_ids must have shape (B, N) = {(batch, seq_len)}, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"document_ids.device must equal q.device ({device}), got {ids.device}")
    if not torch.compiler.is_compiling() and bool((ids[:, 1:] < ids[:, :-1]).any()):
        raise ValueError("document_ids must be non-decreasing along N (each document one contiguous run of tokens)")


def positions_in_document(ids: torch.Tensor) -> torch.Tensor:
    """(B, N): each token's position counted from the first token of its document."""
    N = ids.shape[1]
    index = torch.arange(N, device=ids.device).expand_as(ids)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(first, index, 0).cummax(dim=1).values
    return index - start


def documents(ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each document (one host synchronisation)."""
    N = ids.shape[1]
    rows = []
    for row in (ids[:, 1:] != ids[:, :-1]).cpu():
        cuts = (torch.nonzero(row).flatten() + 1).tolist()
        bounds = [0, *cuts, N]
        rows.append(list(zip(bounds[:-1], bounds[1:])))
    return rows


def document_attention(q, k, v, ids: torch.Tensor, key_padding_mask, attend: Callable):
    """``attend(q, k, v, key_padding_mask)`` -> (out, lse) on each document alone; the pieces put back in order."""
    outs, lses = [], []
    for b, spans in enumerate(documents(ids)):
        pad = None if key_padding_mask is None else key_padding_mask[b : b + 1]
        row = [
            attend(*(x[b : b + 1, :, s:e] for x in (q, k, v)), None if pad is None else pad[:, s:e]) for s, e in spans
        ]
        outs.append(torch.cat([o for o, _ in row], dim=2))
        lses.append(torch.cat([l for _, l in row], dim=2))
    return torch.cat(outs), torch.cat(lses)
