"""A PNG picture of a multiplicity mask (`dilated_mask`), one panel per head, written with the standard library."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

# white: not attended; then darker blues for a key reached by 1, 2, 3+ patterns; grey: the gap between heads
_COLOURS = torch.tensor([[255, 255, 255], [158, 202, 225], [49, 130, 189], [8, 48, 107], [200, 200, 200]], dtype=torch.uint8)


def mask_image(mask: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """(H, N, N) multiplicity -> (N, H * (N + gap) - gap, 3) uint8 RGB, heads side by side (query rows top-down)."""
    if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
        raise ValueError(f"mask must be (H, N, N), got shape {tuple(mask.shape)}")
    H, N, _ = mask.shape
    level = mask.clamp(0, 3).long()
    sep = torch.full((N, gap), 4, dtype=torch.long)
    panels = []
    for h in range(H):
        panels += [level[h].cpu(), sep] if h < H - 1 else [level[h].cpu()]
    return _COLOURS[torch.cat(panels, dim=1)]


def save_mask_png(mask: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """Save `mask_image(mask)` as a PNG, each entry drawn as ``scale`` x ``scale`` pixels."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    rgb = mask_image(mask).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    height, width, _ = rgb.shape
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rgb.reshape(height, -1)], dim=1)  # filter 0 rows

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(raw.contiguous().untyped_storage()), 6))
    png += chunk(b"IEND", b"")
    path = Path(path)
    path.write_bytes(png)
    return path
