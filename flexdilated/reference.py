"""The definition of SPEC §1 written as plainly as possible: a dense (H, N, N) multiplicity and a dense softmax.

The ground truth of the tests, public so users can check the fast path themselves. O(N^2) memory: small N only.
"""

from __future__ import annotations

import math

import torch

from .documents import positions_in_document
from .spec import DilatedSpec, head_offsets


def dilated_mask(spec: DilatedSpec, num_heads: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The multiplicity ``m[h, p, t]``: how many patterns let query p attend key t in head h (int64, (H, N, N)).

    Pattern i with offset o reaches (p, t) iff ``p // w == t // w`` and ``(p % w) % r == o == (t % w) % r``,
    and ``t <= p`` when causal.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    positions = torch.arange(seq_len, device=device)
    return multiplicity(spec, num_heads, positions, positions)


def multiplicity(spec: DilatedSpec, num_heads: int, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``m[h, a, b]`` for query positions ``p[a]`` and key positions ``t[b]`` (1-D int tensors)."""
    p, t = p[:, None], t[None, :]
    m = torch.zeros(num_heads, p.shape[0], t.shape[1], dtype=torch.int64, device=p.device)
    for (w, r), offsets in zip(spec.patterns, head_offsets(spec, num_heads)):
        for h, o in enumerate(offsets):
            if o is not None:
                m[h] += (p // w == t // w) & ((p % w) % r == o) & ((t % w) % r == o)
    if spec.causal:
        m = m * (t <= p)
    return m


def reference_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: DilatedSpec,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out_p = sum_t m e^{s_pt} v_t / sum_t m e^{s_pt}``, ``lse_p = log sum_t m e^{s_pt}``, dense.

    Same arguments and results as `flexdilated.dilated_attention`; computed in float64 for float64 inputs and
    float32 otherwise. Rows with no key give out 0 and LSE -inf, with NaN-free gradients.
    """
    rows = torch.arange(q.shape[2], device=q.device)
    out, lse = reference_rows(q, k, v, spec, rows, scale, key_padding_mask, document_ids=document_ids)
    return (out, lse) if return_lse else out


def reference_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: DilatedSpec,
    rows: torch.Tensor,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for the queries ``q`` (B, H, len(rows), D) at positions ``rows``, against the keys ``k``
    at ``key_positions`` (default: all, 0 .. N-1); ``key_padding_mask[b, t]`` True: key t of batch b is ignored.
    ``document_ids`` (B, N) over the key positions: the multiplicity of each row is taken on positions counted from
    each document's first token, and zero between documents."""
    H, D = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = H // k.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = (x.repeat_interleave(group, dim=1).to(work) for x in (k, v))
    keys = torch.arange(k.shape[2], device=q.device) if key_positions is None else key_positions
    if document_ids is None:
        m = multiplicity(spec, H, rows, keys)
    else:  # per row: positions within the document, no pair across documents
        m = torch.stack([
            multiplicity(spec, H, rel[rows], rel[keys]) * (ids[rows][:, None] == ids[keys][None, :])
            for ids, rel in zip(document_ids, positions_in_document(document_ids))
        ])
    if spec.overlap == "set":
        m = m.clamp(max=1)
    if key_padding_mask is not None:
        m = m * ~key_padding_mask[:, None, None, :]
    s = scale * (q.to(work) @ k.transpose(-1, -2))
    s = torch.where(m > 0, s + torch.log(m.to(work)), float("-inf"))  # weight m: e^{s + log m}; unreached: 0
    top = s.detach().amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)
    e = torch.exp(s - top)
    total = e.sum(-1, keepdim=True)
    empty = total == 0
    total = torch.where(empty, 1.0, total)
    out = ((e / total) @ v).to(q.dtype)
    lse = torch.where(empty, float("-inf"), top + torch.log(total)).squeeze(-1).float()
    return out, lse
