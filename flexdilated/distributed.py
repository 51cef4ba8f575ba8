"""Sequence parallelism: one sequence sharded over the ranks of a process group (LongNet §3.2, done exactly).

Rank ρ of P holds tokens ``[ρ·n, (ρ+1)·n)`` of q, k, v (B, H, n, D), N = P·n. Each pattern (w, r) of the spec
(a segment w ≥ N counts as w = N, the same attention) is one of:

- **local**, ``n % w == 0``: its segments lie inside shards. All local patterns run together as the single-GPU
  `dilated_attention` on the shard: no communication.
- **spanning**, ``w % n == 0``: a segment covers the g = w / n consecutive ranks ``ρ - j .. ρ - j + g - 1``
  (j = ρ mod g). Only the *sparsified* keys and values travel, within those g ranks: for each (kv head, offset o)
  class of the pattern, the tokens of the shard with ``(t mod w) mod r == o`` — ⌈n/r⌉ rows (the last ones padding
  where r does not divide n, masked). ``algorithm="all_gather"`` gathers them (backward: reduce-scatter of their
  gradients, through the traceable functional collectives); ``"ring"`` passes them g - 1 times around the group,
  merging by LSE as they come (one block in memory; backward passes them again with their gradients).
  The local queries of each head's class attend them at their true positions: causal and ``overlap="set"``
  exclusions are exact.
- otherwise a ValueError names w, n, N and P.

The partial results are merged by LSE (`merge.py`). Bytes one rank sends per layer, forward:
``Σ_spanning 2·(g-1)·C·⌈n/r⌉·D·itemsize ≤ Σ 2·(w/r)·C·D·itemsize`` (C classes of the pattern):
bounded by the spec, constant in N. They are counted where they are sent (`count_bytes`), backward too.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .attention import _attention, check_inputs, routed_attention
from .kernels import math_route_rect
from .merge import merge, merge_weight
from .spec import Branch, DilatedSpec, branches

ALGORITHMS = ("all_gather", "ring")
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


# ----------------------------------------------------------------------------------------------- byte counting
_counters: list[dict] = []


@contextlib.contextmanager
def count_bytes():
    """``with count_bytes() as sent:`` — ``sent["forward"]``, ``sent["backward"]``: bytes this rank sent."""
    sent = {"forward": 0, "backward": 0}
    _counters.append(sent)
    try:
        yield sent
    finally:
        _counters.remove(sent)


def _record(kind: str, nbytes: int) -> None:
    for sent in _counters:
        sent[kind] += nbytes


# ------------------------------------------------------------------------------------------------ entry points
def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: DilatedSpec,
    group: dist.ProcessGroup | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    algorithm: str = "all_gather",
):
    """`dilated_attention` of the whole sequence, each rank of ``group`` passing its shard (B, H, n, D) of q and
    (B, Hkv, n, D) of k, v (rank ρ: tokens ρ·n .. ρ·n + n - 1); returns this rank's shard of the output (and LSE).
    Gradients equal those of the single-process call."""
    scale = check_inputs(q, k, v, spec, scale)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    group = dist.group.WORLD if group is None else group
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    B, H, n, D = q.shape
    if not torch.compiler.is_compiling():
        _check_same_shards(q, k, group)
    N = n * P
    spec = replace(spec, segment_lengths=tuple(min(w, N) for w in spec.segment_lengths))
    spanning = _spanning_branches(spec, H, n, N, P)
    if not spanning:
        out, lse = routed_attention(q, k, v, spec, scale)
        return (out, lse.float()) if return_lse else out
    if algorithm == "ring" and torch.compiler.is_compiling():
        raise ValueError('algorithm="ring" runs eagerly; under torch.compile use algorithm="all_gather"')

    outs, lses = [], []
    local = [(w, r) for w, r in spec.patterns if n % w == 0]
    if local and spec.heads == "all":  # the single-GPU fast path on the shard
        sub = replace(spec, segment_lengths=tuple(w for w, _ in local), dilation_rates=tuple(r for _, r in local))
        out, lse = routed_attention(q, k, v, sub, scale)
        outs.append(out)
        lses.append(lse)
    elif local:  # heads="grouped": the local branches of the full spec (a sub-spec would regroup the heads)
        out, lse = _attention(q, k, v, spec, scale, None, [b for b in branches(spec, H) if n % b.segment == 0])
        outs.append(out)
        lses.append(lse)
    for branch in spanning:
        out, lse = _spanning_attention(q, k, v, branch, spec.causal, scale, n, rank, group, algorithm)
        outs.append(out)
        lses.append(lse)
    out, lse = merge(outs, lses)  # every LSE in the working precision (float64 for float64 inputs)
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def dtensor_attention(q, k, v, spec: DilatedSpec, *, scale=None, return_lse=False, algorithm="all_gather"):
    """`dilated_attention` on DTensors sharded along the sequence (``Shard(2)``) over one mesh dimension (and
    replicated over any others): the output is a DTensor placed the same way (the LSE too, ``Shard(2)``)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, DTensor):
            raise TypeError(f"{name} must be a DTensor like q, got {type(x).__name__}")
        if x.device_mesh != q.device_mesh or x.placements != q.placements:
            raise ValueError(f"{name} must have q's mesh and placements {q.placements}, got {x.placements}")
    sharded = [i for i, p in enumerate(q.placements) if p == Shard(2)]
    if len(sharded) != 1 or any(p != Replicate() for i, p in enumerate(q.placements) if i != sharded[0]):
        raise ValueError(
            f"q, k, v must be sharded along the sequence (Shard(2)) on one mesh dimension and replicated on the "
            f"others, got placements {q.placements}"
        )
    mesh, dim = q.device_mesh, sharded[0]
    P, N = mesh.size(dim), q.shape[2]
    if N % P:
        raise ValueError(f"the sequence length N = {N} must be divisible by the {P} ranks it is sharded over")
    result = sequence_parallel_attention(
        q.to_local(), k.to_local(), v.to_local(), spec, mesh.get_group(dim),
        scale=scale, return_lse=return_lse, algorithm=algorithm,
    )
    wrap = lambda x: DTensor.from_local(x, mesh, q.placements, run_check=False)  # noqa: E731
    return (wrap(result[0]), wrap(result[1])) if return_lse else wrap(result)


# ------------------------------------------------------------------------------------------------------- checks
def _check_same_shards(q: torch.Tensor, k: torch.Tensor, group) -> None:
    """Every rank must pass shards of the same shape: else a clear error on every rank (not a hang)."""
    mine = torch.tensor([*q.shape, *k.shape], dtype=torch.int64, device=q.device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    shapes = [tuple(x.tolist()) for x in every]
    if len(set(shapes)) > 1:
        described = ", ".join(f"rank {i}: q {s[:4]}, k {s[4:]}" for i, s in enumerate(shapes))
        raise ValueError(f"every rank must pass shards of the same shape (B, H, n, D); got {described}")


def _spanning_branches(spec: DilatedSpec, H: int, n: int, N: int, P: int) -> list[Branch]:
    out = []
    for b in branches(spec, H):
        if n % b.segment == 0:
            continue
        if b.segment % n:
            raise ValueError(
                f"segment length {b.segment} does not fit the shards: N = {N} tokens over {P} ranks gives n = {n} "
                f"tokens per rank, and a segment must lie inside one shard (n % w == 0) or cover whole shards "
                f"(w % n == 0)"
            )
        out.append(b)
    return out


# ---------------------------------------------------------------------------------------- one spanning pattern
_subgroups: dict[tuple, dist.ProcessGroup] = {}


def _subgroup(group, g: int):
    """The process group of the g consecutive ranks of ``group`` that share this rank's segments, created by
    them (collectively, with a barrier among them alone) the first time they need it."""
    P = dist.get_world_size(group)
    if g == P:
        return group
    ranks = dist.get_process_group_ranks(group)
    start = dist.get_rank(group) // g * g
    key = tuple(ranks[start : start + g])
    if key not in _subgroups:  # only its members create it (other mesh rows create theirs)
        _subgroups[key] = dist.new_group(list(key), timeout=_timeout(group), use_local_synchronization=True)
    return _subgroups[key]


def _timeout(group) -> datetime.timedelta | None:
    try:
        return group.options._timeout
    except AttributeError:
        return None


def _rows(offsets: torch.Tensor, i: torch.Tensor, n: int, r: int):
    """Rows of offset o on the i-th shard of a segment (tokens i·n .. i·n + n - 1 of it): local indices
    ``(o - i·n) mod r + m·r`` for m < ⌈n/r⌉, clamped into the shard, and whether each is a real token (< n)."""
    first = (offsets - i * n) % r
    local = first[..., None] + torch.arange(-(-n // r), device=offsets.device) * r
    return local.clamp(max=n - 1), local < n


def _spanning_attention(q, k, v, branch: Branch, causal: bool, scale: float, n: int, rank: int, group, algorithm):
    """This rank's queries under one spanning pattern: (out (B, H, n, D), lse (B, H, n)), -inf/0 where the
    pattern does not reach (heads it does not use, rows of other offsets)."""
    B, H, _, D = q.shape
    dev = q.device
    w, r = branch.segment, branch.rate
    g, j = w // n, rank % (w // n)
    seg_start = (rank - j) * n
    gqa = H // k.shape[1]
    heads = torch.tensor(branch.heads, device=dev)
    offsets = torch.tensor(branch.offsets, device=dev)
    classes = sorted({(h // gqa, o) for h, o in zip(branch.heads, branch.offsets)})  # (kv head, offset)
    cls_kv = torch.tensor([c[0] for c in classes], device=dev)
    cls_off = torch.tensor([c[1] for c in classes], device=dev)
    cls_of_head = torch.tensor([classes.index((h // gqa, o)) for h, o in zip(branch.heads, branch.offsets)], device=dev)

    q_idx, q_ok = _rows(offsets, torch.tensor(j, device=dev), n, r)  # (H_b, R)
    k_idx, _ = _rows(cls_off, torch.tensor(j, device=dev), n, r)  # (C, R)
    shard = torch.arange(g, device=dev)[:, None]
    k_all, k_ok = _rows(cls_off[None], shard, n, r)  # (g, C, R)
    k_pos = (seg_start + shard[..., None] * n + k_all).transpose(0, 1).flatten(1)  # (C, g*R) true positions
    k_ok = k_ok.transpose(0, 1).flatten(1)
    q_pos = seg_start + j * n + q_idx  # (H_b, R)

    mask_mod = _mask_mod(q_ok, q_pos, k_ok, k_pos, cls_of_head, causal, branch.earlier, dev)
    qg = q[:, heads[:, None], q_idx]  # (B, H_b, R, D)
    kv = torch.stack((k[:, cls_kv[:, None], k_idx], v[:, cls_kv[:, None], k_idx]))  # (2, B, C, R, D)
    sub = _subgroup(group, g)
    if algorithm == "all_gather":
        out, lse = _gathered(qg, kv, g, sub, cls_of_head, mask_mod, scale)
    else:
        out, lse = _Ring.apply(qg, kv, g, j, sub, cls_of_head, mask_mod, scale)

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = torch.where(q_ok, q_idx, n)  # padding rows land on a scratch row n
    out_nat = torch.zeros(B, H, n + 1, D, dtype=acc, device=dev)
    lse_nat = torch.full((B, H, n + 1), float("-inf"), dtype=acc, device=dev)
    out_nat = _put(out_nat, heads, rows, out.to(acc))
    lse_nat = _put(lse_nat, heads, rows, lse.to(acc))
    return out_nat[:, :, :n], lse_nat[:, :, :n]


def _put(buf: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``buf[b, heads[h], rows[h, i]] = x[b, h, i]`` out of place (differentiable)."""
    batch = torch.arange(buf.shape[0], device=buf.device)[:, None, None]
    return buf.index_put((batch, heads[None, :, None], rows[None]), x)


def _mask_mod(q_ok, q_pos, k_ok, k_pos, cls_of_head, causal: bool, earlier, device):
    """keep(h, i, j) for query row i of head h and gathered key j: both real, causal in true positions, and not
    claimed by an earlier pattern (``overlap="set"``)."""
    is_causal = torch.tensor(causal, device=device)
    earlier = [(w_e, r_e, torch.tensor(o_e, device=device)) for w_e, r_e, o_e in earlier]

    def mask_mod(b, h, i, jj):
        c = cls_of_head[h]
        p, t = q_pos[h, i], k_pos[c, jj]
        keep = q_ok[h, i] & k_ok[c, jj] & ((t <= p) | ~is_causal)
        for w_e, r_e, o_e in earlier:
            o = o_e[h]
            keep = keep & ~((p // w_e == t // w_e) & ((p % w_e) % r_e == o) & ((t % w_e) % r_e == o))
        return keep

    return mask_mod


def _per_head(kv: torch.Tensor, cls_of_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, B, C, L, D) class keys and values -> each head's (B, H_b, L, D)."""
    return kv[0][:, cls_of_head], kv[1][:, cls_of_head]


def _gathered(qg, kv, g: int, sub, cls_of_head, mask_mod, scale):
    """All-gather the class keys and values of the g ranks (backward: reduce-scatter), then attend them."""
    _record("forward", kv.numel() * kv.element_size() * (g - 1))
    every = _all_gather(kv.unsqueeze(0), 0, sub)  # (g, 2, B, C, R, D)
    if every.requires_grad:
        every.register_hook(lambda grad: _record("backward", grad.numel() * grad.element_size() * (g - 1) // g))
    every = every.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)  # (2, B, C, g*R, D)
    k, v = _per_head(every, cls_of_head)
    return math_route_rect(qg, k, v, mask_mod, scale)


class _Ring(torch.autograd.Function):
    """Ring over the g ranks of a segment: step s attends the block of shard (j - s) mod g, merged by LSE;
    one block in memory. Backward recomputes each block's attention, sends the block on with its gradient
    accumulators, which reach their owner after g passes (Liu et al.'s ring attention on sparsified blocks)."""

    @staticmethod
    def forward(ctx, qg, kv, g, j, sub, cls_of_head, mask_mod, scale):
        R = kv.shape[3]
        out = lse = None
        block = kv
        for s in range(g):
            src = (j - s) % g
            k, v = _per_head(block, cls_of_head)
            o, l = math_route_rect(qg, k, v, _shift_keys(mask_mod, src * R), scale)
            out, lse = (o, l) if out is None else merge([out, o], [lse, l])
            if s < g - 1:
                block = _pass(block, sub, "forward")
        ctx.save_for_backward(qg, kv, out, lse)
        ctx.args = g, j, sub, cls_of_head, mask_mod, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qg, kv, out, lse = ctx.saved_tensors
        g, j, sub, cls_of_head, mask_mod, scale = ctx.args
        R = kv.shape[3]
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        dq = torch.zeros_like(qg)
        block, dblock = kv, torch.zeros_like(kv)
        for s in range(g):
            src = (j - s) % g
            with torch.enable_grad():
                q_, b_ = qg.detach().requires_grad_(), block.detach().requires_grad_()
                k, v = _per_head(b_, cls_of_head)
                o, l = math_route_rect(q_, k, v, _shift_keys(mask_mod, src * R), scale)
                weight = merge_weight(l, lse).detach()  # this block's share of the merged softmax
                d_o = weight[..., None] * dout
                d_l = weight * ((dout * (o.detach() - out)).sum(-1) + dlse)
                gq, gb = torch.autograd.grad((o, l), (q_, b_), (d_o.to(o.dtype), d_l.to(l.dtype)), allow_unused=True)
            dq += gq if gq is not None else 0
            dblock += gb if gb is not None else 0
            both = _pass(torch.stack((block, dblock)), sub, "backward")  # to the next rank, gradients in tow
            block, dblock = both[0], both[1]
        return dq, dblock, None, None, None, None, None, None


def _shift_keys(mask_mod, start: int):
    return lambda b, h, i, jj: mask_mod(b, h, i, jj + start)


def _pass(x: torch.Tensor, sub, kind: str) -> torch.Tensor:
    """Send ``x`` to the next rank of the ring ``sub`` and receive the previous rank's."""
    g, me = dist.get_world_size(sub), dist.get_rank(sub)
    ranks = dist.get_process_group_ranks(sub)
    x = x.contiguous()
    got = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, ranks[(me + 1) % g], sub), dist.P2POp(dist.irecv, got, ranks[(me - 1) % g], sub)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    _record(kind, x.numel() * x.element_size())
    return got
