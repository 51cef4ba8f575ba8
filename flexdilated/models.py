"""LongNet models assembled from `MultiheadDilatedAttention`.

`LongNetLM`: the decoder-only causal LM of the paper. Pre-LN blocks with MAGNETO's sub-LayerNorms (inside the
attention before its output projection, inside the feed-forward before its second linear) and its init gain
``sqrt(log(2 * depth))`` on the value/output projections and the feed-forward weights; RoPE positions by default,
XPOS (the paper's) with ``position="xpos"`` for sequences up to ≈36k tokens (`positions.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .modules import MultiheadDilatedAttention
from .positions import RotaryEmbedding


class FeedForward(nn.Module):
    """``fc2(LN(gelu(fc1(x))))``, dropout after the activation (MAGNETO's sub-LN)."""

    def __init__(self, dim: int, hidden: int, dropout: float, gain: float) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, dim)
        self.dropout = dropout
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_normal_(fc.weight, gain=gain)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc1(x)), p=self.dropout, training=self.training)
        return self.fc2(self.norm(h))


class DecoderBlock(nn.Module):
    """``x + attn(LN(x))`` then ``x + ffn(LN(x))``, the attention causal and dilated."""

    def __init__(self, dim, num_heads, segment_lengths, dilation_rates, *, ff_mult, dropout, gain, rotary, **attn):
        super().__init__()
        self.attn_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiheadDilatedAttention(
            dim, num_heads, segment_lengths, dilation_rates, dropout=dropout, gamma_init=gain, rotary=rotary, **attn
        )
        self.ff = FeedForward(dim, ff_mult * dim, dropout, gain)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + (self.attn(h, h, h, is_causal=True)[0] if cache is None else self.attn.decode(h, cache))
        return x + self.ff(self.ff_norm(x))


class LongNetLM(nn.Module):
    """Decoder-only causal LM: ``forward(tokens (B, N)) -> logits (B, N, vocab)``; `loss`, `generate`."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        segment_lengths,
        dilation_rates,
        *,
        num_kv_heads: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        position: str | None = "rope",
        tie_embeddings: bool = True,
        checkpointing: bool = False,
        heads: str = "all",
        overlap: str = "multiset",
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if position not in ("xpos", "rope", None):
            raise ValueError(f"position must be 'xpos', 'rope' or None, got {position!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        rotary = None if position is None else RotaryEmbedding(dim // num_heads, xpos=position == "xpos")
        gain = math.sqrt(math.log(2 * depth))
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        self.blocks = nn.ModuleList(
            DecoderBlock(
                dim, num_heads, segment_lengths, dilation_rates, ff_mult=ff_mult, dropout=dropout, gain=gain,
                rotary=rotary, num_kv_heads=num_kv_heads, heads=heads, overlap=overlap,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.checkpointing = checkpointing

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an int tensor (B, N), got {tuple(tokens.shape)} {tokens.dtype}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing and self.training else block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``tokens`` (B, N): predict tokens[:, 1:] from tokens[:, :-1]."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (B, P) with a KV cache; temperature 0 is greedy.
        Returns (B, P + max_new_tokens)."""
        caches: list[dict] = [{} for _ in self.blocks]
        tokens, step = prompt, prompt
        for _ in range(max_new_tokens):
            logits = self.step(step, caches)[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            tokens = torch.cat((tokens, nxt), dim=1)
            step = nxt
        return tokens

    def step(self, tokens: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Logits of ``tokens`` (B, n) following the cached ones (the whole prompt first, then one at a time)."""
        x = self.embed(tokens)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.head(self.norm(x))
