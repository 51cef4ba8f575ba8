"""Attention of one branch on its gathered layout: ``(out, lse)`` with ``lse = log sum_j exp(scale * q_i . k_j)``
over the kept keys (natural log; ``out = 0`` and ``lse = -inf`` on rows that keep nothing).

Two routes with the same semantics:

- ``flex``: ``torch.compile``d ``flex_attention`` with the branch's BlockMask. CUDA, fp16/bf16/fp32; autograd is
  flex's own (gradients flow through the LSE too).
- ``math``: dense masked attention over slabs of the folded batch with a recomputing backward (memory O(N), the
  score tile of one slab at a time). Used on CPU, for float64, for head dims below 16, and under an enclosing
  ``torch.compile`` on CPU.
  In eager CPU calls its forward runs through eager ``flex_attention`` (which has no CPU backward).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from .masks import MaskMod, block_tables

MAX_ELEMENTS = 2**31 - 1  # flex indexes each of q, k, v, out with int32 offsets
SLAB_SCORES = 2**24  # score elements per slab in the math route (64 MiB in float32)

# Flex's backward tiles (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages, num_warps) for fp16/bf16 on sm90 (H100,
# H200), by head dim. `perf/sweep_backward.py` on the H200 (torch 2.11), fwd+bwd of (128, 8, 2048, 64) bf16 over
# SDPA's: flex's default (64, 128, 128, 64, 3, 8) 1.34 (causal 1.27); (64, 64, 64, 64, 3, 4) 1.23 (1.16); these
# 1.22 (1.13). At D 128 flex's default wins: 1.25 (causal 1.27); (64, 64, 64, 64, 3, 4) 1.25 (1.26); these 2.18
# (2.18). Other GPUs, dtypes and head dims keep flex's defaults (not measured; a tile may not fit their memory).
BACKWARD_TILES = {64: (32, 128, 128, 32, 3, 4)}


@torch.compiler.assume_constant_result
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def kernel_options(q: torch.Tensor) -> dict | None:
    """``flex_attention``'s ``kernel_options`` for q: the measured backward tiles where they apply, else None."""
    tiles = BACKWARD_TILES.get(q.shape[-1])
    if tiles is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or not _is_sm90(q.device.index):
        return None
    names = ("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2", "bwd_num_stages", "bwd_num_warps")
    return dict(zip(names, tiles))


@torch.compile(fullgraph=True)
def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float):
    """Our own compiled entry: its compile cache and recompile budget are not shared with other users of
    flex_attention in the process (Dynamo keeps them per code object)."""
    out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options(q),
                              return_aux=AuxRequest(lse=True))
    return out, aux.lse


def compiled_call(compiled, *args, **kwargs):
    """``compiled(*args, **kwargs)``. Dynamo keeps at most 8 compiled versions of a function per process, and with
    ``fullgraph=True`` the 9th raises ``FailOnRecompileLimitHit`` (a process running many specs, dtypes or head
    counts gets there): then the function's versions are dropped and it compiles afresh — slower, never wrong."""
    # Python ints in the arguments (segment lengths, offsets, heads) are the configuration: never symbolic (Dynamo's
    # automatic dynamic shapes would otherwise turn them into SymInts after a second spec, and fail to trace)
    with torch._dynamo.config.patch(specialize_int=True):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            torch._dynamo.eval_frame.remove_from_cache(getattr(compiled, "_torchdynamo_orig_callable", compiled))
            return compiled(*args, **kwargs)


def flex_route(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask_at: Callable[[int], BlockMask], scale: float
):
    """Compiled flex on (Bf, H, L, D) tensors, in slabs of the batch small enough for int32 indexing;
    ``block_mask_at(start)`` is the mask of the slab starting at batch entry ``start``."""
    step = max(1, MAX_ELEMENTS // max(q[0].numel(), 1))
    outs, lses = [], []
    for start in range(0, q.shape[0], step):
        qs, ks, vs = (x[start : start + step] for x in (q, k, v))
        if not torch.compiler.is_compiling():
            for x in (qs, ks, vs):
                torch._dynamo.maybe_mark_dynamic(x, 0)  # one kernel for every N
        out, lse = compiled_call(_flex, qs, ks, vs, block_mask_at(start), scale)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs), torch.cat(lses)


def _keep(mask_mod: MaskMod, start: int, stop: int, heads: int, L: int, device) -> torch.Tensor:
    b = torch.arange(start, stop, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    i = torch.arange(L, device=device)[None, None, :, None]
    return mask_mod(b, h, i, i.transpose(2, 3))


def _working(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _scores(q, k, keep, scale):
    s = (_working(q) @ _working(k).transpose(-1, -2)) * scale
    return s.masked_fill(~keep, float("-inf"))


def _softmax_attend(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(s) @ v`` and ``logsumexp(s)`` over the last dim of masked scores ``s`` (-inf = masked): rows with
    no key give 0 and -inf, with no NaN in value or gradient."""
    top = s.detach().amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(top == float("-inf"), 0.0, top))
    den = e.sum(-1, keepdim=True)
    empty = den == 0
    den = torch.where(empty, 1.0, den)
    return (e @ _working(v)) / den, torch.where(empty, float("-inf"), top + torch.log(den)).squeeze(-1)


class _MathAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_mod, scale, use_flex):
        Bf, H, L, _ = q.shape
        step = max(1, SLAB_SCORES // max(H * L * L, 1))
        out = torch.empty_like(q)
        lse = torch.empty(Bf, H, L, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
        for a in _slab_starts(Bf, step):
            z = min(a + step, Bf)
            if use_flex:
                bm = BlockMask.from_kv_blocks(
                    torch.ones(1, H, 1, dtype=torch.int32, device=q.device),
                    torch.zeros(1, H, 1, 1, dtype=torch.int32, device=q.device),
                    BLOCK_SIZE=max(L, 1),
                    mask_mod=_shifted(mask_mod, a),
                    seq_lengths=(L, L),
                )
                qs, ks, vs = (x[a:z].detach() for x in (q, k, v))  # eager CPU flex refuses tensors needing grad
                with warnings.catch_warnings():  # unfused on purpose: flex compiled on CPU cannot return the LSE
                    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
                    o, aux = flex_attention(qs, ks, vs, block_mask=bm, scale=scale, return_aux=AuxRequest(lse=True))
                out[a:z], lse[a:z] = o, aux.lse
                continue
            s = _scores(q[a:z], k[a:z], _keep(mask_mod, a, z, H, L, q.device), scale)
            out[a:z], lse[a:z] = _softmax_attend(s, v[a:z])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask_mod, ctx.scale, ctx.step = mask_mod, scale, step
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        Bf, H, L, _ = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is None:
            dlse = torch.zeros_like(lse)
        for a in _slab_starts(Bf, ctx.step):
            z = min(a + ctx.step, Bf)
            qs, ks, vs, do = (_working(x[a:z]) for x in (q, k, v, dout))
            s = _scores(qs, ks, _keep(ctx.mask_mod, a, z, H, L, q.device), ctx.scale)
            row_lse = lse[a:z].to(s.dtype)
            p = torch.exp(s - torch.where(row_lse == float("-inf"), 0.0, row_lse)[..., None])
            dv[a:z] = p.transpose(-1, -2) @ do
            delta = (do * _working(out[a:z])).sum(-1, keepdim=True)
            ds = p * (do @ vs.transpose(-1, -2) - delta + dlse[a:z].to(s.dtype)[..., None])
            dq[a:z] = (ds @ ks) * ctx.scale
            dk[a:z] = (ds.transpose(-1, -2) @ qs) * ctx.scale
        return dq, dk, dv, None, None, None


def _slab_starts(total: int, step: int):
    """``range(0, total, step)``, but one slab written without a loop when it covers everything: a loop over a
    symbolic batch size makes Dynamo guard on its exact value (a recompile per N)."""
    return (0,) if total <= step else range(0, total, step)


def _shifted(mask_mod: MaskMod, start: int) -> MaskMod:
    """The mask_mod seen by a slab whose batch entry 0 is entry ``start`` of the whole batch."""
    return mask_mod if start == 0 else (lambda b, h, i, j: mask_mod(b + start, h, i, j))


def math_route_rect(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod: MaskMod, scale: float):
    """(out, lse) of q (B, H, Lq, D) over k, v (B, H, Lk, D) where ``mask_mod(b, h, i, j)`` keeps (one mask for
    every batch entry). CUDA in flex's dtypes: compiled flex with a block mask evaluated one row of query blocks at
    a time; elsewhere dense, differentiable torch ops (O(B·H·Lq·Lk) memory: the tests' sizes)."""
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] >= 16:
        return compiled_call(_flex, q, k, v, _rect_block_mask(mask_mod, H, Lq, Lk, q.device), scale)
    h = torch.arange(H, device=q.device)[:, None, None]
    i = torch.arange(Lq, device=q.device)[None, :, None]
    j = torch.arange(Lk, device=q.device)[None, None, :]
    keep = mask_mod(torch.zeros((), dtype=torch.int64, device=q.device), h, i, j)
    out, lse = _softmax_attend(_scores(q, k, keep, scale), v)
    return out.to(q.dtype), lse


def _rect_block_mask(mask_mod: MaskMod, H: int, Lq: int, Lk: int, device, block: int = 128) -> BlockMask:
    tables = block_tables(mask_mod, H, Lq, Lk, device, block)
    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Lq, Lk))


def math_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mod: MaskMod, scale: float):
    """Dense masked attention in slabs; forward through eager flex on CPU outside ``torch.compile``."""
    use_flex = q.device.type == "cpu" and not torch.compiler.is_compiling()
    return _MathAttention.apply(q, k, v, mask_mod, scale, use_flex)
