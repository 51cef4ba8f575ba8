"""Packed documents: ``document_ids`` (B, N), non-decreasing along N, several documents in one row (SPEC §1).

The result equals running each document alone: positions, segments, head offsets and causality counted from the
document's first token, and no key of another document — the promise of FlashAttention's varlen and of flex
document masks for dense attention. Two routes:

- `packed_attention` (CUDA's strided route): every document of every row is copied into one sequence where each
  starts at a multiple of the largest segment W, then the strided route runs once on it with the real tokens as
  key and row flags. Key blocks holding only the gap after a document are skipped, not masked (`strided.py`), so
  the work is that of the documents alone; the copy costs one pass over q, k, v and out.
- `document_attention`: each document alone through the single-sequence dispatch (every other input).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable

import torch

from .spec import DilatedSpec, fit_to_length
from .strided import strided_attention, strided_classes


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
    # that they are non-decreasing is checked where the routes read them on the host (`document_spans`)


def _firsts(ids: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: whether each token is the first of its document."""
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return first


def document_spans(ids: torch.Tensor) -> list[tuple[int, int]]:
    """The (start, end) of every document, rows one after the other (row b at b * N): one host synchronisation,
    which also checks that the ids are non-decreasing along N."""
    B, N = ids.shape
    decreasing = (ids[:, 1:] < ids[:, :-1]).any()
    starts = torch.cat((_firsts(ids).flatten(), decreasing.view(1))).nonzero().flatten().tolist()
    if starts[-1] == B * N:  # the flag after the tokens
        raise ValueError("document_ids must be non-decreasing along N (each document one contiguous run of tokens)")
    return list(zip(starts, starts[1:] + [B * N]))


def positions_in_document(ids: torch.Tensor) -> torch.Tensor:
    """(B, N): each token's position counted from the first token of its document."""
    N = ids.shape[1]
    index = torch.arange(N, device=ids.device).expand_as(ids)
    start = torch.where(_firsts(ids), index, 0).cummax(dim=1).values
    return index - start


def documents(ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each document (one host synchronisation)."""
    B, N = ids.shape
    spans = document_spans(ids)
    return [[(s - b * N, e - b * N) for s, e in spans if b * N <= s < (b + 1) * N] for b in range(B)]


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


def packed_attention(q, k, v, ids: torch.Tensor, spec: DilatedSpec, scale: float, key_padding_mask=None):
    """(out, lse) of the documents of ``ids`` on the strided route, or None where it does not apply (a segment
    length that does not divide the largest, heads that are no strided view, or documents so short that aligning
    them to W would more than double the tokens). One host synchronisation (where the documents start)."""
    B, H, N, D = q.shape
    spans = document_spans(ids)
    lengths = [e - s for s, e in spans]
    spec = fit_to_length(spec, max(lengths))
    W = max(spec.segment_lengths)
    sizes = [-(-n // W) * W for n in lengths]  # each document padded to whole chunks
    total = sum(sizes)
    if any(W % w for w in spec.segment_lengths) or total > 2 * B * N:
        return None
    classes = strided_classes(*(torch.empty(1, x.shape[1], total, D, device="meta") for x in (q, k)), spec)
    if classes is None:
        return None
    device = q.device
    shift = torch.tensor([a - s for a, (s, _) in zip(accumulate([0, *sizes[:-1]]), spans)], device=device)
    tokens = torch.arange(B * N, device=device)
    at = tokens + shift.repeat_interleave(torch.tensor(lengths, device=device), output_size=B * N)  # aligned place
    # the token at every aligned place; gap places repeat tokens (spread, so that the backward's index_add does not
    # pile onto one row) and are flagged off as keys and rows: none of them enters a softmax
    src = torch.arange(total, device=device) % (B * N)
    src[at] = tokens
    real = torch.zeros(total, dtype=torch.bool, device=device)
    real[at] = True
    key_ok = real if key_padding_mask is None else real & ~key_padding_mask.flatten()[src]
    # (1, H, total, D) views of (total, H, D) gathers: one pass over q, k, v (B > 1 in (B, H, N, D) storage: two)
    aligned = [x.transpose(1, 2).reshape(B * N, x.shape[1], D).index_select(0, src).transpose(0, 1)[None]
               for x in (q, k, v)]
    out, lse = strided_attention(*aligned, spec, classes, scale, key_ok[None], real[None])
    return (out[0].index_select(1, at).view(H, B, N, D).transpose(0, 1),
            lse[0].index_select(1, at).view(H, B, N).transpose(0, 1))
