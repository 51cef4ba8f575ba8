"""The fast CUDA route: every (pattern, head-offset class) is a strided view of q, k, v. No gathers, no copies.

The heads of a branch that share an offset ``o`` form a *class*. When they are an arithmetic progression
``h0 + a*step``, row ``i < L = ceil((w - o) / r)`` of segment ``s`` of the class is token ``s*w + o + i*r``: for
one batch entry, ``x[b, h0::step]`` unflattened to (n, S, w, D) and sliced ``[:, :, o::r]`` is a view (S, n, L, D)
in any memory layout, the segments in flex's batch dimension (``w % r`` need not be 0: the offsets then differ in L
by one). In it the pattern is dense (SPEC §1: ``p // w == t // w`` and p, t share the class's offset)::

    keep(s, i, j) = (j <= i  or  not causal)  and  not excluded(s*w + o + i*r, s*w + o + j*r)

with ``excluded`` the pairs an earlier pattern claims under ``overlap="set"`` (`spec.Branch.earlier`). The block
tables of one segment (`masks._block_tables`) serve every segment and every N.

One compiled function runs every class's flex call, puts the class LSEs back in natural order (`_place_all`: rows
padded to ceil(w / r), concatenated, interleaved, cut to w: Inductor turns it into masked loads), merges them
(`merge.py`), and weights each class output by its merge weight (`_class_view`) before placing and summing them in
one fused kernel (with heads="grouped" the placed outputs are concatenated instead, `_head_spans`). It takes q, k,
v (B, H, N, D) and cuts the C whole chunks of the largest segment W itself: N (and B where it folds into flex's
segments) is the dynamic size, so one compilation serves every N.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from .kernels import compiled_call, kernel_options
from .masks import BLOCK_SIZE, _block_matrices, _block_tables, _first_true, counts
from .merge import merge_lse, merge_weight
from .spec import Branch, DilatedSpec, branches, traced_cache

INT32_ELEMENTS = 2**31  # flex and Inductor index with int32: one call's q spans at most this many elements


@dataclass(frozen=True)
class HeadClass:
    """Heads ``range(*q_heads)`` of one branch, all with offset ``offset``, reading kv heads ``range(*kv_heads)``
    (fewer of them when several query heads share one: flex's GQA). ``branch`` is restricted to these heads;
    ``pattern`` numbers the branch it comes from (two patterns may be equal: each is merged as its own)."""

    branch: Branch
    offset: int
    q_heads: tuple[int, int, int]
    kv_heads: tuple[int, int, int]
    pattern: int


def _progression(xs: list[int]) -> tuple[int, int, int] | None:
    step = xs[1] - xs[0] if len(xs) > 1 else 1
    if step <= 0 or any(b - a != step for a, b in zip(xs, xs[1:])):
        return None
    return xs[0], xs[-1] + 1, step


@traced_cache(maxsize=256)
def head_classes(spec: DilatedSpec, num_heads: int, num_kv_heads: int) -> tuple[HeadClass, ...] | None:
    """The classes of every branch, or None if some class is not a strided view of q or of k."""
    group = num_heads // num_kv_heads
    out = []
    for pattern, branch in enumerate(branches(spec, num_heads)):
        by_offset: dict[int, list[int]] = {}
        for h, o in zip(branch.heads, branch.offsets):
            by_offset.setdefault(o, []).append(h)
        for o, heads in by_offset.items():
            q_heads = _progression(heads)
            kv = [h // group for h in heads]
            distinct = sorted(set(kv))
            repeats = len(kv) // len(distinct)
            kv_heads = _progression(distinct)
            if q_heads is None or kv_heads is None or kv != [u for u in distinct for _ in range(repeats)]:
                return None
            if repeats > 1 and kv_heads[2] != 1 and len(distinct) > 1:
                return None
            at = [branch.heads.index(h) for h in heads]
            earlier = tuple((w, r, tuple(offs[i] for i in at)) for w, r, offs in branch.earlier)
            sub = Branch(branch.segment, branch.rate, tuple(heads), (o,) * len(heads), earlier)
            out.append(HeadClass(sub, o, q_heads, kv_heads, pattern))
    return tuple(out)


def strided_classes(q: torch.Tensor, k: torch.Tensor, spec: DilatedSpec) -> tuple[HeadClass, ...] | None:
    """The classes if the strided route applies to these inputs, else None: every segment length divides the
    largest one W, N is a multiple of W, and each class's heads (and kv heads) are an arithmetic progression."""
    W = max(spec.segment_lengths)
    B, H, N, D = q.shape
    if N % W or any(W % w for w in spec.segment_lengths):
        return None
    classes = head_classes(spec, H, k.shape[1])
    if classes is None or _heads_per_call(classes, B, H, k.shape[1], N, D) is None:
        return None
    return classes


def _heads_per_call(classes: tuple[HeadClass, ...], B: int, H: int, Hkv: int, N: int, D: int) -> int | None:
    """Query heads per compiled call: all of them, or past 2**31 elements of q the most whose q, k, v and out of
    one batch entry stay within int32 offsets and whose groups of heads all have the same classes (one compiled
    graph serves them; groups that differ would make Dynamo turn the offsets symbolic). None if there is none."""
    if B * H * N * D <= INT32_ELEMENTS:
        return H
    g = H // Hkv
    for G in range(H - H % g, 0, -g):
        if H % G == 0 and G * N * D <= INT32_ELEMENTS and len({_restrict(classes, h, h + G, g) for h in range(0, H, G)}) == 1:
            return G
    return None


@traced_cache(maxsize=256)
def _restrict(classes: tuple[HeadClass, ...], start: int, stop: int, group: int) -> tuple[HeadClass, ...]:
    """The classes of query heads ``start .. stop-1`` (kv heads ``start/group ..``), numbered from 0 (``start``
    and ``stop`` multiples of the GQA ``group``: every kv head keeps all of its query heads)."""
    out = []
    for cls in classes:
        b = cls.branch
        at = [i for i, h in enumerate(b.heads) if start <= h < stop]
        if at:
            heads = [b.heads[i] - start for i in at]
            earlier = tuple((w, r, tuple(o_e[i] for i in at)) for w, r, o_e in b.earlier)
            sub = Branch(b.segment, b.rate, tuple(heads), tuple(b.offsets[i] for i in at), earlier)
            kv = sorted({h // group for h in heads})
            out.append(HeadClass(sub, cls.offset, _progression(heads), _progression(kv), cls.pattern))
    return tuple(out)


def _table_branch(cls: HeadClass) -> Branch:
    """The branch whose block tables the class uses: one head (broadcast) when its heads share every offset."""
    b = cls.branch
    if all(len(set(o_e)) == 1 for _, _, o_e in b.earlier):
        return Branch(b.segment, b.rate, (0,), (cls.offset,), tuple((w, r, o_e[:1]) for w, r, o_e in b.earlier))
    return b


@traced_cache(maxsize=256)
def _local_tables(branch: Branch, causal: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Block tables of one segment (kv and q directions, partial and full): (1, heads, L/128[, L/128]) each, with
    L = ceil((w - o) / r) the rows of the branch's (one) offset; then the blocks the pattern reaches and those it
    fills, as dense bool (1, heads, L/128, L/128) matrices (for `_validity`)."""
    L = counts(branch, branch.segment)[0]
    tables = _block_tables(branch, branch.segment, L, causal, device, BLOCK_SIZE)
    mask = BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=BLOCK_SIZE, seq_lengths=(L, L))
    partial, full = _block_matrices(branch, branch.segment, L, causal, device, BLOCK_SIZE)
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
            mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices,
            partial | full, full)


def _rows(x: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    """(B, n, S, L, *E) padded with ``fill`` to ``rows`` rows along L."""
    E = x.dim() - 4
    return x if x.shape[3] == rows else F.pad(x, (0, 0) * E + (0, rows - x.shape[3]), value=fill)


def _natural(x: torch.Tensor, segment: int) -> torch.Tensor:
    """(B, H, S, ceil(w/r), r, *E), row i of offset o at [.., i, o, ..], -> (B, H, S*w, *E): position i*r + o."""
    return x.flatten(3, 4)[:, :, :, :segment].flatten(2, 3)


def _place(parts: list[tuple[HeadClass, torch.Tensor]], num_heads: int, segment: int, rate: int, fill: float,
           first: int = 0):
    """Class results (B, n, S, L_o, *E) back in natural order (B, H, N, *E) (heads ``first .. first + H - 1``): row
    i of offset o is position ``i*r + o`` of its segment, i.e. (B, H, S, ceil(w/r), r, *E) cut to w; ``fill`` where
    the pattern reaches no row."""
    B, _, S, _, *E = parts[0][1].shape
    rows = -(-segment // rate)
    base = parts[0][1].new_full((B, num_heads, S, rows, rate, *E), fill)
    for cls, x in parts:
        start, stop, step = cls.q_heads
        heads = base[:, start - first : stop - first : step].select_scatter(_rows(x, rows, fill), 4, cls.offset)
        base = base.slice_scatter(heads, 1, start - first, stop - first, step)
    return _natural(base, segment)


def _place_all(parts: list[tuple[HeadClass, torch.Tensor]], num_heads: int, segment: int, rate: int, fill: float):
    """`_place` for classes ``c, c + r, c + 2r, ...`` (c = 0 .. r-1, heads="all" with r | H): one concatenation,
    a head permutation and a diagonal select, which Inductor keeps in one pointwise kernel."""
    rows = -(-segment // rate)
    x = torch.cat([_rows(x, rows, fill) for _, x in sorted(parts, key=lambda p: p[0].offset)], dim=1)  # (c, a) order
    x = x.unflatten(1, (rate, num_heads // rate)).transpose(1, 2).flatten(1, 2)  # natural head h = a*r + c
    E = x.dim() - 4
    h = torch.arange(num_heads, device=x.device)
    keep = (h[:, None] % rate == torch.arange(rate, device=x.device)).view(1, num_heads, 1, 1, rate, *(1,) * E)
    return _natural(torch.where(keep, x.unsqueeze(4), fill), segment)


def _class_view(x: torch.Tensor, cls: HeadClass) -> torch.Tensor:
    """The inverse of `_place` for one class, as `_folded_view` reads q: x (B, H, S*w) in natural order -> its rows
    (B, n, S, L), a view: row i of offset o is position ``i*r + o`` of its segment."""
    x = _every(x, 1, *cls.q_heads).unflatten(2, (-1, cls.branch.segment))
    return _every(x, 3, cls.offset, cls.branch.segment, cls.branch.rate)


def _head_spans(by_pattern: dict[int, list], num_heads: int) -> list[tuple[int, int, int]] | None:
    """``(first, stop, pattern)`` in head order when the patterns' heads are disjoint ranges that tile
    ``0 .. H-1`` (heads="grouped", more than one pattern), else None. Then each row's merge would be of one
    result: ``lse = lse_p``, weight exp(0) = 1 (0 where no pattern reaches the row, as is the output), so the
    results are concatenated instead, without the H-wide (B, H, N, D) buffer per pattern a merge reads."""
    spans = []
    for pattern, parts in by_pattern.items():
        heads = sorted(h for cls, _, _ in parts for h in range(*cls.q_heads))
        if len(set(heads)) != len(heads) or heads[-1] + 1 - heads[0] != len(heads):
            return None
        spans.append((heads[0], heads[-1] + 1, pattern))
    spans.sort()
    stops = [0] + [stop for _, stop, _ in spans]
    if len(spans) < 2 or stops[-1] != num_heads or [first for first, _, _ in spans] != stops[:-1]:
        return None
    return spans


def _is_all(classes: list[HeadClass], num_heads: int, rate: int) -> bool:
    """Whether the classes are ``c, c + r, ...`` with offset c, for c = 0 .. r-1 (heads="all", r | H)."""
    full = [(c, c + num_heads - rate + 1, rate) for c in range(rate)]
    return num_heads % rate == 0 and sorted(c.q_heads for c in classes) == full and all(
        c.offset == c.q_heads[0] for c in classes
    )


def _batch_fold(q, k, v, cls: HeadClass) -> str | None:
    """Where one flex call puts the batch of the class's views of q, k, v (B, H, C, W, D), without a copy:

    - ``"heads"``: the class's heads ``h0 + a*step`` step through all H heads (heads="all": n * step == H), so in a
      (B, H, N, D) layout entry b + 1 starts where head n would: x[:, heads] views as (B * n, ...);
    - ``"segments"``: the chunks of entry b + 1 start where chunk C would (a (B, N, H, D) layout seen through
      ``.transpose(1, 2)``, what modules pass): x views as (n, B * C, W, D);
    - None: one flex call per batch entry.

    Flex marks its head count static under Dynamo, so only the segment fold keeps the batch size dynamic (the head
    fold compiles once per batch size)."""
    pairs = ((q, cls.q_heads), (k, cls.kv_heads), (v, cls.kv_heads))
    if q.shape[0] == 1 or all(x.stride(0) == len(range(*h)) * h[2] * x.stride(1) for x, h in pairs):
        return "heads"
    if all(x.stride(0) == x.shape[2] * x.stride(2) for x, _ in pairs):
        return "segments"
    return None


def _folded_view(x: torch.Tensor, heads: tuple[int, int, int], segment: int, rate: int, offset: int, fold: str):
    """(B, H, C, W, D) -> the class's rows as flex's (batch, heads, L, D), a view (the caller checked
    `_batch_fold`): (S, B * n, L, D) when the batch folds into the heads, (B * S, n, L, D) into the segments."""
    x = _every(x, 1, *heads)  # (B, n, C, W, D)
    x = x.flatten(0, 1) if fold == "heads" else x.transpose(0, 1).flatten(1, 2)  # (B*n, C, W, D) | (n, B*C, W, D)
    x = x.unflatten(2, (x.shape[2] // segment, segment)).flatten(1, 2)  # (., S', w, D)
    return _every(x, 2, offset, segment, rate).transpose(0, 1)


def _every(x: torch.Tensor, dim: int, start: int, stop: int, step: int) -> torch.Tensor:
    """``x`` at ``start, start + step, ... < stop`` along ``dim`` (a static size), a view. Where that runs to the end
    of a size that ``step`` divides, it is ``dim`` unflattened to (size / step, step) with index ``start`` selected:
    its gradient then reads entry ``i // step`` where ``i % step == start``. A strided slice's gradient reads
    ``(i - start) // step``; summed over the classes into dq (dk, dv) in one fused kernel, Triton 3.6 (torch 2.11)
    miscompiled that when Inductor's shapes were static, as in a user's own torch.compile: dq 37 % wrong on the H200,
    right without Inductor's divisible-by-16 hints to Triton or without fusion (`perf/NOTES.md` attempt 20)."""
    size = x.shape[dim]
    if step > 1 and size % step == 0 and start < step and stop > start + size - step:
        return x.unflatten(dim, (size // step, step)).select(dim + 1, start)
    return x[(slice(None),) * dim + (slice(start, stop, step),)]


def _unfold(x: torch.Tensor, batch: int, fold: str) -> torch.Tensor:
    """Flex's (S, B * n, L, *E) or (B * S, n, L, *E) -> (B, n, S, L, *E)."""
    return x.transpose(0, 1).unflatten(0, (batch, -1)) if fold == "heads" else x.unflatten(0, (batch, -1)).transpose(1, 2)


def _segment_mask_mod(cls: HeadClass, causal: bool, device: torch.device):
    """The class's mask in one segment (b = flex's batch entry, h = its head; both fold the batch in), rows i, j < L.
    Positions are ``p = b*w + o + i*r``: with the batch folded into b they shift by a multiple of N, which every
    segment length divides, so the set-exclusions below are unchanged."""
    w, r, o = cls.branch.segment, cls.branch.rate, cls.offset
    n = len(cls.branch.heads)
    earlier = [(w_e, r_e, torch.tensor(o_e, device=device)) for w_e, r_e, o_e in cls.branch.earlier]

    def mask_mod(b, h, i, j):
        keep = (j <= i) | (not causal)
        p, t = b * w + o + i * r, b * w + o + j * r
        for w_e, r_e, o_e in earlier:
            oe = o_e[h % n]
            keep = keep & ~((p // w_e == t // w_e) & ((p % w_e) % r_e == oe) & ((t % w_e) % r_e == oe))
        return keep

    return mask_mod


@traced_cache(maxsize=256)
def _class_rows(classes: tuple[HeadClass, ...], causal: bool, W: int, device: torch.device):
    """Every segment of every class in a chunk of W, R in all, as rows of one table: their positions (R, P), W (a
    False sentinel) past a class's L rows up to P (the most rows of any class, in whole blocks); row i at
    ``start + i * rate`` for i < ``length`` as (R,) tensors; the blocks the class's pattern reaches and those it
    fills (R, h, P/128, P/128), False past its blocks and heads (h: the most table heads of a class); and where
    each class's segments start among the R, and its table heads. One gather (or one division), one `_first_true`
    serve every class."""
    local, table_index = _tables(classes, causal, device)
    P = max(-(-counts(c.branch, c.branch.segment)[0] // BLOCK_SIZE) * BLOCK_SIZE for c in classes)
    nb, h = P // BLOCK_SIZE, max(t[8].shape[1] for t in local)
    j = torch.arange(P, device=device)
    rows, first, line, matrices = [], [], [], []
    for c, index in zip(classes, table_index):
        w, r = c.branch.segment, c.branch.rate
        L = counts(c.branch, w)[0]
        reach, full = (F.pad(x[0], (0, nb - x.shape[-1], 0, nb - x.shape[-2], 0, 0)) for x in local[index][8:])
        reach, full = (F.pad(x, (0, 0, 0, 0, 0, h - x.shape[0])) if x.shape[0] > 1 else x.expand(h, nb, nb)
                       for x in (reach, full))
        first.append(len(rows))
        rows += [torch.where(j < L, s * w + c.offset + j * r, W) for s in range(W // w)]
        line += [(s * w + c.offset, r, L) for s in range(W // w)]
        matrices += [torch.stack((reach, full))] * (W // w)
    start, rate, length = torch.tensor(line, device=device).unbind(1)
    heads = tuple(local[index][8].shape[1] for index in table_index)
    return torch.stack(rows), (start, rate, length), torch.stack(matrices, 1), tuple(first), heads


def _bounds(flags: torch.Tensor) -> torch.Tensor:
    """(..., W) bool -> (..., 2) int32 ``[first, last + 1)`` of the True entries, (0, 0) where there is none: the
    interval that holds them (all of it True exactly when ``flags.sum(-1) == last + 1 - first``)."""
    j = torch.arange(flags.shape[-1], device=flags.device, dtype=torch.int32)
    last = torch.where(flags, j + 1, 0).amax(-1)
    first = torch.minimum(torch.where(flags, j, flags.shape[-1]).amin(-1), last)
    return torch.stack((first, last), -1)


def _row_bounds(bounds: torch.Tensor, line) -> torch.Tensor:
    """Token bounds [a, e) per chunk (B, C, 2) -> the rows of every class segment they hold (B, C, R, 2): row i at
    token ``start + i * rate`` is inside when ``ceil((a - start) / rate) <= i < ceil((e - start) / rate)``, cut to
    [0, length]."""
    start, rate, length = (x[:, None] for x in line)
    x = bounds[:, :, None, :] - start
    return torch.div(-x, rate, rounding_mode="floor").neg().clamp(min=0).minimum(length).int()


def _block_overlap(bounds: torch.Tensor, blocks: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` (..., 2) -> how many of them each block of BLOCK_SIZE rows holds (..., blocks)."""
    edge = torch.arange(blocks, device=bounds.device) * BLOCK_SIZE
    lo, hi = bounds[..., :1], bounds[..., 1:]
    return (torch.minimum(hi, edge + BLOCK_SIZE) - torch.maximum(lo, edge)).clamp(min=0)


def _validity(q, k, v, classes: tuple[HeadClass, ...], causal: bool, keys: torch.Tensor, rows: torch.Tensor | None):
    """Per class, per flex call of the class (one, or one per batch entry when the batch does not fold), its flex
    tables (8, both directions) and the keys its mask_mod reads, for q, k, v (B, H, C, W, D) where only some keys
    count: given per chunk as flags (B, C, W) or, when they are one interval in every chunk, as its bounds
    (B, C, 2) (`_bounds`). kv blocks with no key that counts are skipped, blocks with some are partial (the
    mask_mod reads the keys: flags (S, Lp) or row bounds (S, 2) per flex entry), full ones stay full; given
    ``rows`` (B, C, 2), bounds of the rows that count, query blocks without one are skipped too (their rows give 0
    and -inf, or are never read).

    Flex's kernels run 1.6 x (causal 4.6 x) slower with a mask_mod that reads one flag per key, and as fast as
    without when it compares j with two bounds (`perf/probe_validity.py`, NOTES attempt 13). Built eagerly before
    the compiled call (inside the graph, Inductor's kernels for them made illegal memory accesses on the H200,
    torch 2.11), all classes at once: host time here is time the GPU waits."""
    B, W = q.shape[0], q.shape[3]
    positions, line, (reach, full), first, heads = _class_rows(classes, causal, W, q.device)
    nb = positions.shape[1] // BLOCK_SIZE
    if keys.dtype == torch.bool:  # flags: gathered per class row, the sentinel W reading False
        keys = F.pad(keys, (0, 1), value=False)[:, :, positions]  # (B, C, R, P)
        count = keys.unflatten(-1, (-1, BLOCK_SIZE)).sum(-1)
    else:
        keys = _row_bounds(keys, line)  # (B, C, R, 2)
        count = _block_overlap(keys, nb)
    some = (count > 0)[..., None, None, :]  # (B, C, R, 1, 1, nb)
    if rows is not None:
        some = some & (_block_overlap(_row_bounds(rows, line), nb) > 0)[..., None, :, None]
    full = full & (count == BLOCK_SIZE)[..., None, None, :] & some  # (B, C, R, h, nb, nb)
    partial = reach & some & ~full
    num, index = _first_true(torch.stack((partial, full, partial.mT, full.mT)))  # (4, B, C, R, h, nb[, nb])
    out = []
    for cls, start, h in zip(classes, first, heads):
        stop, n = start + W // cls.branch.segment, len(cls.branch.heads)
        nq = -(-counts(cls.branch, cls.branch.segment)[0] // BLOCK_SIZE)
        tables = num[:, :, :, start:stop, :h, :nq], index[:, :, :, start:stop, :h, :nq, :nq]
        class_keys = keys[:, :, start:stop]
        if class_keys.dtype == torch.bool:
            class_keys = class_keys[..., : nq * BLOCK_SIZE]
        fold = _batch_fold(q, k, v, cls)
        if fold is None:  # one call per batch entry, each as the heads fold of batch 1
            calls = [([t[:, b : b + 1] for t in tables], class_keys[b : b + 1], "heads", 1) for b in range(B)]
        else:
            calls = [(tables, class_keys, fold, B)]
        out.append(tuple(_flex_tables(*call, n) for call in calls))
    return tuple(out)


def _flex_tables(tables, keys, fold: str, batch: int, n: int):
    """Tables (4, B, C, S_c, h, nq[, nk]) and keys (B, C, S_c, .) of one class -> its 8 flex tables, contiguous
    (flex's kernels index them as such), and its keys as its mask_mod reads them: (S, B * n) tables and (B, S, .)
    keys when the batch folds into flex's heads, (B * S, n) and (B * S, .) when into its segments."""
    out = []
    for t in tables:
        if fold == "heads":  # one table per (segment, entry, head): (4, C, S_c, B, h, ...) -> (4, S, B * n, ...)
            t = t.permute(0, 2, 3, 1, *range(4, t.dim()))
            t = t.expand(*t.shape[:4], n if batch > 1 else t.shape[4], *t.shape[5:])
            t = t.reshape(4, -1, t.shape[3] * t.shape[4], *t.shape[5:])
        else:  # (4, B * S, h, ...)
            t = t.reshape(4, -1, *t.shape[4:])
        out.append(t.contiguous().unbind(0))
    keys = keys.flatten(1, 2)
    return tuple(x for pair in zip(*out) for x in pair), keys if fold == "heads" else keys.flatten(0, 1)


def _folded_flex(q, k, v, cls: HeadClass, local, causal: bool, scale: float, fold: str, valid=None):
    """Flex on the class's folded views of q, k, v (B, H, C, W, D), the whole batch in one call:
    out (B, n, S, L, D), lse (B, n, S, L). ``valid``: the class's tables and keys from `_validity` (keys that do not
    count masked, their blocks skipped)."""
    r, w = cls.branch.rate, cls.branch.segment
    B = q.shape[0]
    qc = _folded_view(q, cls.q_heads, w, r, cls.offset, fold)
    kc, vc = (_folded_view(x, cls.kv_heads, w, r, cls.offset, fold) for x in (k, v))
    L = qc.shape[2]
    mask_mod = _segment_mask_mod(cls, causal, q.device)
    if valid is not None:
        tables, keys = valid
        n = len(cls.branch.heads)

        def key_mod(b, h, i, j):  # keys (B, S, .) with the batch in flex's heads (entry h // n), else (B * S, .)
            at = (h // n, b) if fold == "heads" else (b,)
            counts = keys[(*at, j)] if keys.dtype == torch.bool else (j >= keys[(*at, 0)]) & (j < keys[(*at, 1)])
            return mask_mod(b, h, i, j) & counts

        mask = BlockMask((L, L), *tables, BLOCK_SIZE=(BLOCK_SIZE, BLOCK_SIZE), mask_mod=key_mod)
    else:
        tables = local[:8]
        if fold == "heads" and local[0].shape[1] > 1 and B > 1:  # per-head tables: one copy per batch entry
            tables = [t.repeat(1, B, *(1,) * (t.dim() - 2)) for t in tables]
        mask = BlockMask((L, L), *tables, BLOCK_SIZE=(BLOCK_SIZE, BLOCK_SIZE), mask_mod=mask_mod)
    out, aux = flex_attention(qc, kc, vc, block_mask=mask, scale=scale, enable_gqa=qc.shape[1] != kc.shape[1],
                              kernel_options=kernel_options(qc), return_aux=AuxRequest(lse=True))
    return _unfold(out, B, fold), _unfold(aux.lse, B, fold)


def _chunks(x: torch.Tensor, W: int, dim: int) -> torch.Tensor:
    """The whole chunks of W along ``dim`` of x, viewed as (..., N // W, W, ...): the last N % W tokens left out."""
    return x.narrow(dim, 0, x.shape[dim] // W * W).unflatten(dim, (-1, W))


def _strided_attention(q, k, v, W: int, classes: tuple[HeadClass, ...], tables, table_index, causal: bool,
                       scale: float, out: torch.Tensor | None = None, valid=None):
    """q (B, H, N, D), k, v (B, Hkv, N, D) -> (out (B, H, C*W, D), lse (B, H, C*W), q, k, v's last W tokens,
    *merge weights) of the C whole chunks of the largest segment W (the spec's: with grouped heads a pattern may have
    no class). They are cut and viewed as (B, H, C, W, D) here, inside the graph, so that their strides are
    expressions of N, which Inductor proves 16-aligned (a prefix view passed in carries strides of its own; as free
    symbols they cost flex's kernels their aligned loads: 34.3 vs 22.3 ms at 1M, `perf/NOTES.md` attempt 12).

    Where N % W != 0 the last W tokens are copied out for the gather route, which attends the tail (the last N - C*W
    of them; empty copies otherwise): the tail's gradients then join the chunks' in the one kernel that writes dq
    (dk, dv), where a slice of q taken outside would add a full-size gradient of its own (`perf/NOTES.md` attempt
    18). W tokens, not N - C*W: a copy of symbolic length would guard on that length being 0 or 1 (a compile each).

    ``valid``: `_validity` of the keys (and rows) that count, e.g. padding or packed documents.
    With ``out`` given (inference in slabs), the result is written into it. The merge weights (none for grouped
    heads, `_head_spans`) are returned only so that Inductor computes them once per row: inlined into the output
    kernel they cost an exp per element (2.25 -> 1.40 ms at N = 2**20, `perf/NOTES.md`)."""
    lasts = [x[:, :, x.shape[2] - W :].clone() if x.shape[2] % W else x.new_empty(*x.shape[:2], 0, x.shape[3])
             for x in (q, k, v)]  # W long: no guard on the tail's length (N % W == 0 or not: one anyway)
    q, k, v = (_chunks(x, W, 2) for x in (q, k, v))
    B, H, C, W, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    by_pattern: dict[int, list] = {}
    for i, (cls, index) in enumerate(zip(classes, table_index)):
        fold = _batch_fold(q, k, v, cls)
        if fold is not None:
            o, lse = _folded_flex(q, k, v, cls, tables[index], causal, scale, fold, valid and valid[i][0])
        else:  # one call per batch entry (the batch size is then no dynamic size)
            parts = [
                _folded_flex(*(x[b : b + 1] for x in (q, k, v)), cls, tables[index], causal, scale, "heads",
                             valid and valid[i][b])
                for b in range(B)
            ]
            o, lse = (torch.cat(x) if B > 1 else x[0] for x in zip(*parts))
        by_pattern.setdefault(cls.pattern, []).append((cls, o, lse))
    spans = _head_spans(by_pattern, H)  # each pattern on its own heads, or on all H
    lses, placed = [], []  # per pattern: its LSE in natural order; how to place its classes' results, and them
    for first, stop, pattern in spans or [(0, H, pattern) for pattern in by_pattern]:
        parts = by_pattern[pattern]
        w, r = parts[0][0].branch.segment, parts[0][0].branch.rate
        at = dict(num_heads=stop - first, segment=w, rate=r)
        place = functools.partial(_place_all, **at) if _is_all([c for c, _, _ in parts], H, r) else \
            functools.partial(_place, **at, first=first)
        lses.append(place([(c, lse.to(acc)) for c, _, lse in parts], fill=float("-inf")))
        placed.append((place, parts))
    if spans is not None:  # every head in one pattern (heads="grouped"): its result as it is, nothing to merge
        merged = torch.cat([place([(c, o) for c, o, _ in parts], fill=0.0) for place, parts in placed], 1)
        lse, weights = torch.cat(lses, 1), []
    else:  # each class output weighted in its own layout, then placed: the backward keeps flex's class outputs
        # only, not also their placed copies (or float32 casts: o * weight computes in the weights' dtype)
        lse = merge_lse(lses)
        weights = [merge_weight(part, lse) for part in lses]
        merged = sum(
            place([(c, o * _class_view(weight, c)[..., None]) for c, o, _ in parts], fill=0.0)
            for (place, parts), weight in zip(placed, weights)
        ).to(q.dtype)
    if out is None:
        return merged, lse, *lasts, *weights
    out.copy_(merged)
    return out, lse, *lasts, *weights


_compiled = torch.compile(_strided_attention, fullgraph=True)
# Inference: elements of q per slab of chunks. Slabs bound the extra memory to one slab's class outputs but cost
# time (W1 at N = 2**20 in slabs of 2**27: 35.6 ms, peak 1.13 x q,k,v,out; one call: 22.4 ms, 1.46 x; the paper's
# spec at 2**20 with H * D = 768 in two slabs: 73.7 ms, 1.74 x its dense core), so they start past 2**30 elements
# (2M tokens at H * D = 512), where memory, not time, is what runs out.
SLAB_ELEMENTS = 2**30


def strided_attention(q, k, v, spec: DilatedSpec, classes: tuple[HeadClass, ...], scale: float,
                      key_ok: torch.Tensor | None = None, row_ok: torch.Tensor | None = None):
    """`dilated_attention` of the whole chunks of the largest segment W, the first N - N % W tokens, on the strided
    route (the caller checked `strided_classes` on them): one compiled call for all heads (past 2**31 elements of
    q: per batch entry and group of heads, `_heads_per_call`), and when no gradient is needed and q has more than
    SLAB_ELEMENTS elements, one per slab of whole chunks, written in place.
    ``key_ok``: the keys that count, (B, N) bool token flags or (B, N // W, 2) bounds [first, last) of each chunk's
    (one interval per chunk); ``row_ok``: the rows that count, the same way (see `_validity`).
    Returns (out, lse) of the whole chunks and (q, k, v) of the last N % W tokens, the tail, for the gather route:
    copies made by the compiled call where there is one (their gradients join the chunks' in one kernel)."""
    B, H, N, D = q.shape
    W, g = max(spec.segment_lengths), H // k.shape[1]
    N -= N % W
    tail = [x[:, :, N:] for x in (q, k, v)]  # views; one compiled call returns copies instead (their gradients)
    G = _heads_per_call(classes, B, H, k.shape[1], N, D)
    everything = (slice(None),) * 3
    groups = [(everything, classes)] if G == H else [
        ((slice(b, b + 1), slice(h, h + G), slice(h // g, (h + G) // g)), _restrict(classes, h, h + G, g))
        for b in range(B) for h in range(0, H, G)
    ]

    def flags(b, rows=slice(None)):  # cut by tokens, bounds by chunks
        chunks = slice(rows.start and rows.start // W, rows.stop and rows.stop // W)
        return [None if x is None else x[b, rows if x.dtype == torch.bool else chunks] for x in (key_ok, row_ok)]

    slab = max(1, SLAB_ELEMENTS // ((B if G == H else 1) * G * W * D))  # chunks per slab
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if torch.compiler.is_compiling() or needs_grad or (G == H and slab >= N // W):
        results = [_call(q[b, hq], k[b, hk], v[b, hk], W, cls, spec.causal, scale, None, *flags(b))
                   for (b, hq, hk), cls in groups]
        if len(results) == 1:
            out, lse, *lasts = results[0]
            return out, lse, [x[:, :, W - (q.shape[2] - N) :] for x in lasts]  # the tail, of the copies
        out, lse = (torch.cat(x, 1).view(B, H, *x[0].shape[2:]) for x in list(zip(*results))[:2])  # (b, h) order
        return out, lse, tail
    out, lse = q.new_empty(B, H, N, D), q.new_empty(B, H, N, dtype=torch.float32)
    for (b, hq, hk), cls in groups:
        for a in range(0, N, slab * W):
            rows = slice(a, a + slab * W)
            part = q[b, hq, rows], k[b, hk, rows], v[b, hk, rows]
            lse[b, hq, rows] = _call(*part, W, cls, spec.causal, scale, out[b, hq, rows], *flags(b, rows))[1]
    return out, lse, tail


def _call(q, k, v, W: int, classes: tuple[HeadClass, ...], causal: bool, scale: float, out=None, key_ok=None,
          row_ok=None):
    """One compiled `_strided_attention` on (B, H, N, D) tensors, and key and row flags (B, N) or bounds (B, C, 2)
    (`strided_attention`): (out, lse) of the first N - N % W tokens, and copies of q's, k's and v's last W tokens
    (empty where W divides N); traced in place under an enclosing torch.compile."""
    tables = _tables(classes, causal, q.device)
    valid = None
    if key_ok is not None:
        keys = _chunks(key_ok, W, 1) if key_ok.dtype == torch.bool else key_ok
        if keys.dtype == torch.bool and not torch.compiler.is_compiling():  # (traced, the sync would break the graph)
            hull = _bounds(keys)
            if bool((keys.sum(-1) == hull[..., 1] - hull[..., 0]).all()):  # one host sync: an interval per chunk
                keys = hull
        rows = row_ok
        if rows is not None and rows.dtype == torch.bool:  # skipping by their hull: only less skipped
            rows = _bounds(_chunks(rows, W, 1))
        valid = _validity(*(_chunks(x, W, 2) for x in (q, k, v)), classes, causal, keys, rows)
    args = classes, *tables, causal, scale
    if torch.compiler.is_compiling():
        return _strided_attention(q, k, v, W, *args, None, valid)[:5]
    # No dynamic marks: the first compile is static (31 s cold instead of 76 at B 8, and 1.18 instead of 1.21 x the
    # dense core, `perf/NOTES.md` attempt 19); a changed B or N recompiles once with that size symbolic (Dynamo's
    # automatic dynamic shapes), then serves every later value.
    return compiled_call(_compiled, q, k, v, W, *args, out=out, valid=valid)[:5]


@traced_cache(maxsize=256)
def _tables(classes: tuple[HeadClass, ...], causal: bool, device: torch.device):
    """The distinct block tables of the classes, and which one each class uses."""
    distinct: list[Branch] = []
    keys: list[tuple] = []  # plain tuples: Dynamo compares these, not dataclass instances
    index = []
    for cls in classes:
        b = _table_branch(cls)
        key = (b.segment, b.rate, b.heads, b.offsets, b.earlier)
        if key not in keys:
            keys.append(key)
            distinct.append(b)
        index.append(keys.index(key))
    return tuple(_local_tables(b, causal, device) for b in distinct), tuple(index)
