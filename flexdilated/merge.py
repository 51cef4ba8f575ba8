"""Merging branch results by their log-sum-exp, NaN-safe where every branch is empty (LSE = -inf).

For branches with partial results ``(out_i, lse_i)`` over disjoint key sets, the attention over their union is

    lse = log sum_i exp(lse_i),        out = sum_i exp(lse_i - lse) * out_i

(with ``out = 0``, ``lse = -inf`` where every ``lse_i`` is -inf). Gradients flow through the weights: the merge
is exact, unlike merges that detach them.
"""

from __future__ import annotations

from typing import Sequence

import torch

NEG_INF = float("-inf")


def merge_lse(lses: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log sum_i exp(lse_i)``, -inf where all are -inf, with no NaN in value or gradient."""
    stacked = torch.stack(list(lses))
    top = stacked.detach().amax(0)
    top = torch.where(top == NEG_INF, 0.0, top)  # any finite shift is exact; 0 keeps empty rows NaN-free
    total = torch.exp(stacked - top).sum(0)
    empty = total == 0
    return torch.where(empty, NEG_INF, top + torch.log(torch.where(empty, 1.0, total)))


def merge_weight(lse_i: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(lse_i - lse)``: the share of branch i in the merged softmax; 0 where ``lse_i`` is -inf."""
    return torch.exp(lse_i - torch.where(lse == NEG_INF, 0.0, lse))


def merge(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attentions ``outs[i]`` (..., D) with ``lses[i]`` (...) into one ``(out, lse)``."""
    lse = merge_lse(lses)
    out = sum(merge_weight(part, lse)[..., None] * o.to(lse.dtype) for o, part in zip(outs, lses))
    return out, lse
