"""The dilated-attention spec (SPEC §1) and how it splits into per-pattern branches.

A spec is a list of patterns ``(w_i, r_i)``. Head ``h`` uses pattern ``i`` with offset ``o(h, i)``; query ``p``
attends key ``t`` under ``(h, i)`` iff ``p // w == t // w`` and ``(p % w) % r == o == (t % w) % r``
(and ``t <= p`` when causal).

A *branch* is one pattern together with the heads that use it and their offsets. The fast path computes one
attention per branch and merges the branches by their log-sum-exp (`merge.py`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from functools import lru_cache, wraps

import torch

def traced_cache(maxsize: int):
    """``lru_cache`` outside ``torch.compile``; under an enclosing compile the function itself is called (and
    traced), since Dynamo cannot trace through the cache."""

    def decorate(fn):
        cached = lru_cache(maxsize=maxsize)(fn)

        @wraps(fn)
        def call(*args):
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        return call

    return decorate


HEAD_MODES = ("all", "grouped")
OVERLAP_MODES = ("multiset", "set")


INT64_MAX = 2**63 - 1


def _positive_ints(name: str, values) -> tuple[int, ...]:
    """Python ints from any integer-like values (``operator.index``: numpy and 0-d torch integers too), each in
    ``1 .. 2**63 - 1``; bools are refused."""
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    out = []
    for v in values:
        not_scalar = isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool")
        not_scalar = not_scalar or getattr(v, "ndim", 0) != 0  # a 1-element array is no scalar
        try:
            i = None if not_scalar else operator.index(v)
        except TypeError:
            i = None
        if i is None or not 0 < i <= INT64_MAX:
            raise ValueError(f"{name} must hold positive ints up to 2**63 - 1, got {v!r} in {values!r}")
        out.append(i)
    return tuple(out)


@dataclass(frozen=True)
class DilatedSpec:
    """Patterns ``(segment_lengths[i], dilation_rates[i])`` plus ``causal``, ``heads`` and ``overlap``.

    ``heads="all"``: every head uses every pattern with offset ``h % r_i`` (LongNet).
    ``heads="grouped"``: heads split into ``len(patterns)`` contiguous groups, the first ``H % G`` one head
    larger; group ``g`` uses pattern ``g`` only, offset ``g % r_g`` (dilated-attention-pytorch).
    ``overlap="multiset"``: a key reached by ``m`` patterns is weighted ``m`` (LongNet's LSE merge);
    ``overlap="set"``: it counts once.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool = False
    heads: str = "all"
    overlap: str = "multiset"

    def __post_init__(self) -> None:
        w = _positive_ints("segment_lengths", self.segment_lengths)
        r = _positive_ints("dilation_rates", self.dilation_rates)
        if not w:
            raise ValueError("segment_lengths must hold at least one pattern, got ()")
        if len(w) != len(r):
            raise ValueError(
                f"segment_lengths and dilation_rates must have equal lengths, got {len(w)} and {len(r)}"
            )
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")
        if self.heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {HEAD_MODES}, got {self.heads!r}")
        if self.overlap not in OVERLAP_MODES:
            raise ValueError(f"overlap must be one of {OVERLAP_MODES}, got {self.overlap!r}")
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)

    @property
    def patterns(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.segment_lengths, self.dilation_rates))


def fit_to_length(spec: DilatedSpec, seq_len: int) -> DilatedSpec:
    """The same attention over ``seq_len`` tokens with every segment at most ``max(2**ceil(log2 seq_len), 2**16)``.

    A segment ``w >= N`` covers all N tokens (``p // w == 0``, ``p % w == p``), so any other length ``>= N`` gives
    the same mask: a user's "whole sequence" segment of up to 2**63 - 1 tokens runs with the indices of a short one.
    Segments up to 2**16 are never changed, so that every length (and every packed document) of a usual spec shares
    one set of compiled kernels; past it, a power of two keeps their number logarithmic.
    """
    if all(w <= 2**16 or w <= seq_len for w in spec.segment_lengths):  # (no arithmetic on a symbolic N)
        return spec
    cap = max(1 << max(seq_len - 1, 1).bit_length(), 2**16)
    return replace(spec, segment_lengths=tuple(min(w, cap) for w in spec.segment_lengths))


def head_offsets(spec: DilatedSpec, num_heads: int) -> list[list[int | None]]:
    """``offsets[i][h]``: the offset of head ``h`` under pattern ``i``, or None if ``h`` does not use it."""
    n = len(spec.patterns)
    if spec.heads == "all":
        return [[h % r for h in range(num_heads)] for _, r in spec.patterns]
    sizes = [num_heads // n + (g < num_heads % n) for g in range(n)]
    offsets: list[list[int | None]] = []
    start = 0
    for g, (_, r) in enumerate(spec.patterns):
        offsets.append([g % r if start <= h < start + sizes[g] else None for h in range(num_heads)])
        start += sizes[g]
    return offsets


@dataclass(frozen=True)
class Branch:
    """One pattern with the heads that use it.

    ``earlier`` lists, for ``overlap="set"``, the patterns that claim a shared (query, key) pair before this
    one: ``(w_e, r_e, offsets_e)`` with ``offsets_e[k]`` the offset of ``heads[k]`` under that pattern.
    """

    segment: int
    rate: int
    heads: tuple[int, ...]
    offsets: tuple[int, ...]
    earlier: tuple[tuple[int, int, tuple[int, ...]], ...] = ()

    @property
    def nested(self) -> bool:
        """Whether every earlier pattern's segments tile this one's: then the set-exclusion mask is the same in
        every segment (otherwise it depends on the segment index and is applied element-wise)."""
        return all(self.segment % w_e == 0 for w_e, _, _ in self.earlier)


@traced_cache(maxsize=256)
def branches(spec: DilatedSpec, num_heads: int) -> tuple[Branch, ...]:
    """The branches of ``spec`` for ``num_heads`` heads, smallest segment first.

    (Under ``torch.compile(dynamic=True)`` the spec's ints may arrive symbolic.)

    With ``overlap="set"`` a (query, key) pair reached by several patterns is given to the first branch in this
    order; later branches exclude it (their ``earlier`` field). ``earlier`` is padded to the same length in every
    branch of a spec with a pattern that reaches nothing (offset -1), so that all branches share one kernel.
    """
    offsets = head_offsets(spec, num_heads)
    order: list[int] = []  # stable insertion sort by segment: Dynamo cannot sort() by symbolic keys, but compares
    for i, w in enumerate(spec.segment_lengths):
        at = len(order)
        while at and spec.segment_lengths[order[at - 1]] > w:
            at -= 1
        order.insert(at, i)
    out: list[Branch] = []
    for n, i in enumerate(order):
        w, r = spec.patterns[i]
        heads = tuple(h for h in range(num_heads) if offsets[i][h] is not None)
        if not heads:
            continue
        earlier = []
        if spec.overlap == "set":
            for e in order[:n]:
                if all(offsets[e][h] is not None for h in heads):  # "grouped" never shares a head
                    we, re_ = spec.patterns[e]
                    earlier.append((we, re_, tuple(offsets[e][h] for h in heads)))
        out.append(Branch(w, r, heads, tuple(offsets[i][h] for h in heads), tuple(earlier)))
    slots = max(len(b.earlier) for b in out)
    return tuple(
        Branch(b.segment, b.rate, b.heads, b.offsets, b.earlier + ((1, 1, (-1,) * len(b.heads)),) * (slots - len(b.earlier)))
        for b in out
    )
