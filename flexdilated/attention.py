"""``dilated_attention``: the public entry point (SPEC §1).

Each branch (pattern + the heads using it, `spec.py`) is gathered into a dense layout with segments folded into
the batch (`layout.py`), attended with a block mask (`masks.py`, `kernels.py`) and put back in natural order,
where the branches are merged by their log-sum-exp (`merge.py`).
"""

from __future__ import annotations

import math

import torch

from .documents import check_document_ids, document_attention, packed_attention
from .kernels import flex_route, math_route
from .layout import Unit, gather, head_index, natural_index, units
from .masks import branch_block_mask, branch_mask_mod
from .merge import merge_lse
from .reference import reference_rows
from .spec import Branch, DilatedSpec, branches, fit_to_length
from .strided import strided_attention, strided_classes

FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPES = FLEX_DTYPES + (torch.float64,)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: DilatedSpec, scale: float | None) -> float:
    """Validate the arguments of `dilated_attention`; returns the scale to use."""
    if not isinstance(spec, DilatedSpec):
        raise TypeError(f"spec must be a flexdilated.DilatedSpec, got {type(spec).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}.device must equal q.device ({q.device}), got {x.device}")
    B, H, N, D = q.shape
    if N == 0:
        raise ValueError("q must have a sequence length N >= 1, got N = 0")
    if D == 0:
        raise ValueError("q must have a head dimension D >= 1, got D = 0")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Nk, Dk = k.shape
    if (Bk, Nk, Dk) != (B, N, D):
        raise ValueError(
            f"k must match q in batch, length and head dim (B={B}, N={N}, D={D}), got B={Bk}, N={Nk}, D={Dk}"
        )
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's heads ({Hkv})")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def check_key_padding_mask(mask: torch.Tensor, batch: int, seq_len: int, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {getattr(mask, 'dtype', mask)!r}")
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"key_padding_mask must have shape (B, N) = {(batch, seq_len)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask.device must equal q.device ({device}), got {mask.device}")


def _is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor" and type(x).__module__.startswith("torch.distributed")


def _use_flex(q: torch.Tensor) -> bool:
    """The compiled flex route: CUDA, half or single precision, head dim >= 16 (flex's smallest)."""
    return q.is_cuda and q.dtype in FLEX_DTYPES and q.shape[-1] >= 16


def _pad_tails(q: torch.Tensor) -> bool:
    """Gather tails into whole-segment shapes where a compiled kernel would otherwise recompile per tail."""
    return _use_flex(q)


def _attend(q, k, v, branch: Branch, unit: Unit, causal: bool, scale: float, key_ok: torch.Tensor | None):
    segments = dict(first_segment=unit.first_segment, num_segments=unit.num_segments)
    if key_ok is not None:  # per-batch key validity in the gathered layout: the dense route, on every device
        pattern = branch_mask_mod(branch, unit.seglen, causal, q.device, **segments)
        return math_route(q, k, v, lambda b, h, i, j: pattern(b, h, i, j) & key_ok[b, h, j], scale)
    if _use_flex(q):

        def masks(start: int):
            return branch_block_mask(branch, unit.seglen, unit.rows, causal, q.device, batch_start=start, **segments)

        return flex_route(q, k, v, masks, scale)
    return math_route(q, k, v, branch_mask_mod(branch, unit.seglen, causal, q.device, **segments), scale)


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: DilatedSpec,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    sequence_parallel: str = "all_gather",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of SPEC §1.

    q: (B, H, N, D); k, v: (B, Hkv, N, D) with H % Hkv == 0 (GQA: query head h reads kv head h // (H // Hkv)).
    Returns out (B, H, N, D) in q's dtype, and with ``return_lse`` the float32 natural-log LSE (B, H, N):
    ``out_p = sum_t m e^{s_pt} v_t / sum_t m e^{s_pt}``, ``s = scale * <q_p, k_t>``, m the multiplicity of (p, t)
    (``min(m, 1)`` for ``overlap="set"``); rows that reach no key give 0 and LSE -inf.
    ``key_padding_mask`` (B, N) bool, True where a key is padding, removes those keys from every pattern (as in
    ``nn.MultiheadAttention``); on CUDA's strided route its key blocks are skipped, elsewhere it takes the dense
    route (`kernels.math_route`).
    ``document_ids`` (B, N) integers, non-decreasing along N: packed documents, each attended alone (positions,
    segments and causality counted from its first token; no key of another document), `documents.py`.
    DTensors sharded along the sequence (``Shard(2)``) run sequence-parallel (`distributed.py`), the keys of
    segments that span shards exchanged by ``sequence_parallel="all_gather"`` or ``"ring"``; the result is a DTensor
    placed like q.
    """
    if _is_dtensor(q):
        from .distributed import dtensor_attention

        if key_padding_mask is not None or document_ids is not None:
            raise ValueError("key_padding_mask and document_ids are not supported with DTensor inputs")
        return dtensor_attention(q, k, v, spec, scale=scale, return_lse=return_lse, algorithm=sequence_parallel)
    scale = check_inputs(q, k, v, spec, scale)
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[2], q.device)
    if document_ids is None:
        out, lse = routed_attention(q, k, v, spec, scale, key_padding_mask)
    else:
        check_document_ids(document_ids, q.shape[0], q.shape[2], q.device)
        packed = packed_attention(q, k, v, document_ids, spec, scale, key_padding_mask) if _use_flex(q) else None
        if packed is not None:
            out, lse = packed
        else:
            attend = lambda q, k, v, pad: routed_attention(q, k, v, spec, scale, pad)  # noqa: E731
            out, lse = document_attention(q, k, v, document_ids, key_padding_mask, attend)
    return (out, lse.float()) if return_lse else out


def routed_attention(q, k, v, spec: DilatedSpec, scale: float, key_padding_mask=None):
    """The dispatch of `dilated_attention` on checked inputs: (out, lse), the LSE in the working precision
    (float64 for float64 inputs, else float32)."""
    B, H, N, D = q.shape
    spec = fit_to_length(spec, N)
    whole = _whole_chunks(spec, N) if _use_flex(q) else 0
    classes = strided_classes(q[:, :, :whole], k[:, :, :whole], spec) if whole else None
    if classes is not None:  # the strided route on whole chunks of the largest segment
        key_ok = None if key_padding_mask is None else ~key_padding_mask
        out, lse, tail = strided_attention(q, k, v, spec, classes, scale, key_ok)  # the whole chunks
        if whole < N:  # chunks are independent: the last, partial one alone on the gather route
            pad = None if key_padding_mask is None else key_padding_mask[:, whole:]
            tail, tail_lse = _attention(*tail, spec, scale, pad)
            out, lse = torch.cat((out, tail), 2), torch.cat((lse.to(tail_lse.dtype), tail_lse), 2)
        return out, lse
    slab = slab_length(spec, B * H * D, N)
    if slab >= N:
        return _attention(q, k, v, spec, scale, key_padding_mask)
    # independent slabs of whole chunks: the extra memory is that of one slab
    out = q.new_empty(B, H, N, D)
    lse = torch.empty(B, H, N, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    for a in range(0, N, slab):
        pad = None if key_padding_mask is None else key_padding_mask[:, a : a + slab]
        out[:, :, a : a + slab], lse[:, :, a : a + slab] = _attention(
            *(x[:, :, a : a + slab] for x in (q, k, v)), spec, scale, pad
        )
    return out, lse


def dilated_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: DilatedSpec,
    *,
    scale: float | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal decoding: the one query ``q`` (B, H, 1, D) at position ``p = N - 1`` against the cached keys
    ``k``, ``v`` (B, Hkv, N, D) at positions 0 .. p. Equal to row p of `dilated_attention` (``spec.causal``);
    it reads only the keys of p's segments, at most ``max(segment_lengths)`` of them.
    ``starts`` (B,) ints: row b's first ``starts[b]`` keys are left padding, and the row attends as if it began
    there (its padding a document of its own: `dilated_attention`'s ``document_ids``); no host synchronisation."""
    if not spec.causal:
        raise ValueError("dilated_attention_step decodes causally: spec.causal must be True")
    p = k.shape[2] - 1
    rows = torch.tensor([p], device=q.device)
    if starts is None:
        start, ids = min(p - p % w for w in spec.segment_lengths), None
    else:  # a row's segments start at most max(w) - 1 before p, wherever its own positions begin
        start = max(0, p + 1 - max(spec.segment_lengths))
        ids = (torch.arange(p + 1, device=q.device) >= starts[:, None]).long()
    keys = torch.arange(start, p + 1, device=q.device)
    out, _ = reference_rows(q, k[:, :, start:], v[:, :, start:], spec, rows, scale, key_positions=keys,
                            document_ids=ids)
    return out


SLAB_ELEMENTS = 2**26  # elements of q in one slab: 128 MiB in bf16


def _whole_chunks(spec: DilatedSpec, seq_len: int) -> int:
    """Tokens in whole chunks of the largest segment W, if every segment length divides W (then chunks are
    independent), else 0."""
    W = max(spec.segment_lengths)
    return 0 if any(W % w for w in spec.segment_lengths) else seq_len - seq_len % W


def slab_length(spec: DilatedSpec, token_elements: int, seq_len: int) -> int:
    """Tokens per slab: whole chunks of the largest segment, about SLAB_ELEMENTS elements of q (at least one
    chunk). Chunks are independent only if every segment length divides the largest: otherwise one slab."""
    chunk = max(spec.segment_lengths)
    if any(chunk % w for w in spec.segment_lengths):
        return seq_len
    return chunk * max(1, SLAB_ELEMENTS // (token_elements * chunk))


def _attention(
    q, k, v, spec: DilatedSpec, scale: float, key_padding_mask, only: list[Branch] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One slab: attend every branch (or those in ``only``) in its gathered layout, then merge the branches by LSE
    in natural order.

    Natural-order buffers have one extra position, N, where padding rows are scattered (`layout.natural_index`).
    """
    B, H, N, D = q.shape
    group = H // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    results = []  # (heads, natural index, out, lse) per unit, in the gathered layout
    lses = []  # each branch's LSE in natural order, -inf where it reaches nothing
    for branch in branches(spec, H) if only is None else only:
        heads, kv_heads = head_index(branch, 1, q.device), head_index(branch, group, q.device)
        lse_branch = torch.full((B, H, N + 1), float("-inf"), dtype=acc, device=q.device)
        for unit in units(branch, N, pad_tail=_pad_tails(q) and key_padding_mask is None):
            qg = gather(q, branch, unit, heads)
            kg, vg = (gather(x, branch, unit, kv_heads) for x in (k, v))
            key_ok = None
            if key_padding_mask is not None:
                key_ok = gather(~key_padding_mask[:, None], branch, unit, torch.zeros_like(heads))
            out_g, lse_g = _attend(qg, kg, vg, branch, unit, spec.causal, scale, key_ok)
            index = heads[:, None], natural_index(branch, unit, N, q.device)
            lse_branch[:, index[0], index[1]] = lse_g.to(acc).unflatten(0, (B, unit.num_segments))
            results.append((index, out_g, lse_g))
        lses.append(lse_branch)

    lse = merge_lse(lses)
    lse_safe = torch.where(lse == float("-inf"), 0.0, lse)
    out = torch.zeros(B, H, N + 1, D, dtype=acc, device=q.device)
    for (heads, tokens), out_g, lse_g in results:
        lse_g = lse_g.to(acc).unflatten(0, (B, -1))
        weight = torch.exp(lse_g - lse_safe[:, heads, tokens])  # 0 on padding rows (their LSE is -inf)
        out[:, heads, tokens] += out_g.to(acc).unflatten(0, (B, -1)) * weight[..., None]
    return out[:, :, :N].to(q.dtype).contiguous(), lse[:, :, :N]
