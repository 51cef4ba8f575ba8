"""Packed documents: ``document_ids`` (B, N), non-decreasing along N, several documents in one row (SPEC §1).

The result equals running each document alone: positions, segments, head offsets and causality counted from the
document's first token, and no key of another document — the promise of FlashAttention's varlen and of flex
document masks for dense attention. Two routes:

- `packed_attention` (CUDA's strided route): every document of every row is copied into one sequence where each
  starts at a multiple of the largest segment W, then the strided route runs once on it with the bounds of each
  chunk's real tokens (a prefix of it) as those of its rows and, without ``key_padding_mask``, of its keys (with
  it, flags per key). Key blocks holding only the gap after a
  document are skipped, not masked (`strided.py`), so the work is that of the documents alone; the copies
  (`_Align`, `_Unalign`: row gathers both ways, forward and backward) cost one pass over q, k, v, out and LSE.
- `document_attention`: each document alone through the single-sequence dispatch (every other input).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable

import torch

from .kernels import compiled_call
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
    them to W would more than double the tokens). One host synchronisation (where the documents start); the
    rest is known on the host from there, so the tables are built while the GPU copies."""
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
    shifts = [a - s for a, (s, _) in zip(accumulate([0, *sizes[:-1]]), spans)]
    # every aligned chunk's real tokens are a prefix of it: [0, min(W, rest of the document))
    bounds = [(0, min(W, n - c)) for n, size in zip(lengths, sizes) for c in range(0, size, W)]
    host = torch.tensor(shifts + lengths + [x for b in bounds for x in b], dtype=torch.int64)
    host = host.to(device, non_blocking=True)  # pageable: copied before it returns, no wait for the GPU
    shift, length, bounds = host.split((len(shifts), len(lengths), 2 * len(bounds)))
    rows = bounds.view(1, -1, 2).int()
    tokens = torch.arange(B * N, device=device)
    at = tokens + shift.repeat_interleave(length, output_size=B * N)  # each token's aligned place
    src = torch.arange(total, device=device) % (B * N)  # the token at every aligned place (gaps: any token)
    src[at] = tokens
    keys = rows
    if key_padding_mask is not None:  # flags: the real tokens that are no padding
        keys = torch.zeros(total, dtype=torch.bool, device=device)
        keys[at] = ~key_padding_mask.flatten()
        keys = keys[None]
    # (1, H, total, D) copies of q, k, v: the gaps hold tokens that are no key of any row; their rows are dropped
    places = _places(at, B, H, total)  # of q's tokens (and out's, LSE's); k's and v's with their own heads
    kv_places = places if k.shape[1] == H else _places(at, B, k.shape[1], total)
    aligned = [_Align.apply(x, src, p) for x, p in ((q, places), (k, kv_places), (v, kv_places))]
    out, lse, _ = strided_attention(*aligned, spec, classes, scale, keys, rows)  # aligned: whole chunks, no tail
    return _Unalign.apply(out, places, B), _Unalign.apply(lse[..., None], places, B)[..., 0]


def _storage_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int, int]]:
    """x (B, H, N, D) as a 2-D view (rows, D) of its storage from the storage's start to x's last row, the row of
    x[0, 0, 0] and the row strides (b, h, t): token (b, h, t) is row ``first + b * sb + h * sh + t * st``. Any
    layout whose D values are whole rows of the storage: (B, H, N, D), its (B, N, H, D) transposes, slices of a
    packed qkv; others are copied first. Starting at the storage's start, slices at any offset share one compiled
    gather."""
    D = x.shape[-1]
    if x.stride(-1) != 1 or any(s % D for s in x.stride()[:3]) or x.storage_offset() % D:
        x = x.clone(memory_format=torch.contiguous_format)  # (contiguous() would keep a misaligned offset)
    first = x.storage_offset() // D
    rows = first + sum((n - 1) * s for n, s in zip(x.shape[:3], x.stride()[:3])) // D + 1
    return x.as_strided((rows, D), (D, 1), 0), first, tuple(s // D for s in x.stride()[:3])


def _rows_at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[index]


_compiled_rows_at = torch.compile(_rows_at, fullgraph=True)


def _take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for 2-D x (rows, E), on CUDA by Inductor's gather: 0.72 ms for the 10M rows of D = 64 in bf16 of
    the documents at 1M, where eager ``index_select`` and ``x[index]`` of these rows take 6.2 ms
    (`perf/probe_rows.py`, H200).
    One compilation per dtype and E, every number of rows."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return x[index]
    for t in (x, index):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return compiled_call(_compiled_rows_at, x, index)


def _put_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[index] = rows`` in place (``index`` without repeats: no atomics), as 8-byte words where they allow
    (1.08 ms with the zeros for the documents at 1M, `perf/probe_rows.py`)."""
    rows = rows.contiguous()
    if x.shape[1] * x.element_size() % 8 or rows.storage_offset() * rows.element_size() % 8:
        return x.index_copy_(0, index, rows)
    x.view(torch.int64).index_copy_(0, index, rows.view(torch.int64))
    return x


def _places(at: torch.Tensor, batch: int, heads: int, total: int) -> torch.Tensor:
    """(B * H * N,): the row of (1, H, total, .) where token (b, h, t) lies, ``h * total + at[b * N + t]``."""
    places = torch.arange(heads, device=at.device)[:, None] * total + at.view(batch, 1, -1)
    return places.flatten()


class _Align(torch.autograd.Function):
    """x (B, H, N, D) -> y (1, H, T, D), ``y[0, h, p] = x[b, h, t]`` with ``src[p] = b * N + t``; every token lies
    at its place (``places``, `_places`) and the other places are gaps, which never reach the result: no key
    there counts, and their rows are dropped by `_Unalign`, whose gradient there is zero. So the gradient is a
    gather too, ``dx[b, h, t] = dy[0, h, at[b * N + t]]``, the gaps' gradients (zero) dropped, where autograd's own
    would be an ``index_add`` over every place (7.4 ms per tensor for the documents at 1M, H200,
    `perf/probe_rows.py`)."""

    @staticmethod
    def forward(ctx, x, src, places):
        B, H, N, D = x.shape
        rows, first, (sb, sh, st) = _storage_rows(x)
        tokens = first + torch.div(src, N, rounding_mode="floor") * sb + src % N * st
        index = tokens + torch.arange(H, device=x.device)[:, None] * sh
        ctx.save_for_backward(places)
        ctx.shape = x.shape
        return _take_rows(rows, index.flatten()).view(1, H, -1, D)

    @staticmethod
    def backward(ctx, dy):
        (places,) = ctx.saved_tensors
        return _take_rows(dy.reshape(-1, dy.shape[-1]), places).view(ctx.shape), None, None


class _Unalign(torch.autograd.Function):
    """y (1, H, T, E) -> x (B, H, N, E), ``x[b, h, t] = y[0, h, at[b * N + t]]``: the tokens back from their aligned
    places (``places``, `_places`). Backward: the gradient put at the same places, zero at the gaps."""

    @staticmethod
    def forward(ctx, y, places, batch):
        H, E = y.shape[1], y.shape[-1]
        ctx.save_for_backward(places)
        ctx.shape = y.shape
        return _take_rows(y.reshape(-1, E), places).view(batch, H, -1, E)

    @staticmethod
    def backward(ctx, dx):
        (places,) = ctx.saved_tensors
        E = dx.shape[-1]
        return _put_rows(dx.new_zeros(ctx.shape).view(-1, E), places, dx.reshape(-1, E)).view(ctx.shape), None, None
