"""A picture of a multiplicity mask (`dilated_mask`), one panel per head, drawn with matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

# white: not attended; then darker blues for a key reached by 1, 2, 3+ patterns
COLOURS = ("#ffffff", "#9ecae1", "#3182bd", "#08306b")
LEVELS = ("0: not attended", "1 pattern", "2 patterns", "3+ patterns")
PANEL_INCHES, COLUMNS, DPI = 2.6, 4, 150


def plot_mask(mask: torch.Tensor, path: str | Path | None = None, *, heads: Sequence[int] | None = None,
              title: str | None = None):
    """Draw the ``(H, N, N)`` multiplicity ``mask`` of `dilated_mask`, one panel per head (up to 4 a row): key
    position t across, query position p down, white where p does not attend t and darker blues where 1, 2, 3 or
    more patterns reach (p, t). ``heads`` picks the heads to draw (default: all), ``title`` goes above the panels.
    Saves the picture to ``path`` if given (PNG, or the format matplotlib infers from its suffix) and returns the
    `matplotlib.figure.Figure` (no pyplot: no global state is touched). Needs ``pip install flexdilated[plot]``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3 or mask.shape[1] != mask.shape[2] or mask.numel() == 0:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be an (H, N, N) tensor of multiplicities (dilated_mask), got {got}")
    if mask.is_complex() or (mask < 0).any() or (mask.is_floating_point() and not torch.equal(mask, mask.round())):
        raise ValueError("mask must hold non-negative whole numbers (how many patterns reach each (p, t))")
    H, N, _ = mask.shape
    heads = list(range(H)) if heads is None else list(heads)
    if not heads or any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < H for h in heads):
        raise ValueError(f"heads must be a non-empty list of head indices in 0..{H - 1}, got {heads!r}")
    try:
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError("plot_mask needs matplotlib: pip install flexdilated[plot]") from e

    cols = min(len(heads), COLUMNS)
    rows = math.ceil(len(heads) / cols)
    legend_cols = len(LEVELS) if cols > 2 else cols  # one or two panels: the legend wraps to fit their width
    legend_inches = 0.25 * len(LEVELS) // legend_cols
    fig = Figure(figsize=(PANEL_INCHES * cols, (PANEL_INCHES + 0.4) * rows + legend_inches + 0.3 * (title is not None)),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap, norm = ListedColormap(COLOURS), BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], len(COLOURS))
    level = mask.detach().clamp(max=3).to("cpu", torch.uint8).numpy()
    ticks = range(0, N, 2 ** max(0, round(math.log2(N / 4))))  # powers of two: segment boundaries
    for i, ax in enumerate(axes.flat):
        if i >= len(heads):
            ax.remove()
            continue
        h = heads[i]
        ax.imshow(level[h], cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"head {h}")
        ax.set_xlabel("key position t")
        if i % cols == 0:
            ax.set_ylabel("query position p")
        ax.set_xticks(ticks), ax.set_yticks(ticks)
    handles = [Patch(facecolor=c, edgecolor="0.5", linewidth=0.5) for c in COLOURS]
    fig.legend(handles, LEVELS, loc="outside lower center", ncols=legend_cols, frameon=False)
    if title is not None:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig
