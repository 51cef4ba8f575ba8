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
    cap = max(1 << max(seq_len - 1, 1).bit_length(), 2**16)
    if all(w <= cap for w in spec.segment_lengths):
        return spec
    return replace(spec, segment_lengths=tuple(min(w, cap) for w in spec.segment_lengths))
