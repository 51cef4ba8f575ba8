"""Thin modules over `dilated_attention`: `DilatedAttention` on (B, H, N, D) and `MultiheadDilatedAttention`, a
drop-in for self-attention with ``nn.MultiheadAttention(batch_first=True)`` on (B, N, E); and
`MultiheadCrossAttention`, the dense attention from one sequence to another of an encoder–decoder.

MultiheadDilatedAttention follows MAGNETO (Wang et al., 2022), as LongNet does: a LayerNorm on the attention
output before the output projection (``sub_ln``), and Xavier-normal initialisation with gain ``gamma_init`` on the
value and output projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import dilated_attention, dilated_attention_step
from .positions import RotaryEmbedding
from .spec import DilatedSpec


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DilatedAttention(nn.Module):
    """``forward(q, k, v, key_padding_mask=None)`` on (B, H, N, D) and (B, Hkv, N, D): `dilated_attention` with a
    fixed spec and scale."""

    def __init__(
        self,
        segment_lengths,
        dilation_rates,
        *,
        causal: bool = False,
        heads: str = "all",
        overlap: str = "multiset",
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = DilatedSpec(segment_lengths, dilation_rates, causal=causal, heads=heads, overlap=overlap)
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        return dilated_attention(q, k, v, self.spec, scale=self.scale, key_padding_mask=key_padding_mask)

    def extra_repr(self) -> str:
        return f"{self.spec}, scale={self.scale}"


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated self-attention on (B, N, E) (or (N, B, E) with ``batch_first=False``).

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, is_causal=False)``
    returns ``(out, None)``. ``key_padding_mask`` (B, N) bool, True where a key is padding, is composed with the
    pattern. ``dropout`` applies to the attention output (B, N, E) before the sub-LayerNorm and the output
    projection, in training mode: FlexAttention has no dropout on the attention probabilities.
    ``num_kv_heads`` < ``num_heads`` gives grouped-query attention; ``rotary`` rotates q and k by their positions.
    ``decode`` attends new tokens against a cache of the keys and values before them (causal generation).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths,
        dilation_rates,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = True,
        sub_ln: bool = True,
        gamma_init: float = 1.0,
        num_kv_heads: int | None = None,
        heads: str = "all",
        overlap: str = "multiset",
        device=None,
        dtype=None,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_kv_heads = _positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not (isinstance(gamma_init, (int, float)) and math.isfinite(gamma_init) and gamma_init > 0):
            raise ValueError(f"gamma_init must be a finite number > 0, got {gamma_init!r}")
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.gamma_init = dropout, batch_first, gamma_init
        self.specs = {
            causal: DilatedSpec(segment_lengths, dilation_rates, causal=causal, heads=heads, overlap=overlap)
            for causal in (False, True)
        }
        kv_dim = self.num_kv_heads * self.head_dim
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(embed_dim, **factory) if sub_ln else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.rotary = rotary
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights (gain ``gamma_init`` on the value and output projections), zero biases."""
        g = self.gamma_init
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, g), (self.out_proj, g)):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("need_weights=True is not supported: dilated attention never forms the (N, N) weights")
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported (a dense mask defeats the pattern): use is_causal or key_padding_mask"
            )
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must be (B, N, {self.embed_dim}), got shape {tuple(x.shape)}")
        if key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
            raise ValueError(
                f"key and value must have the query's batch and length {tuple(query.shape[:2])} (self-attention), "
                f"got {tuple(key.shape[:2])} and {tuple(value.shape[:2])}"
            )
        q, k, v = self._project(query, key, value, offset=0)
        out = dilated_attention(q, k, v, self.specs[bool(is_causal)], key_padding_mask=key_padding_mask)
        out = self._output(out)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _project(self, query, key, value, offset: int):
        q = rearrange(self.q_proj(query), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(key), "b n (h d) -> b h n d", h=self.num_kv_heads)
        v = rearrange(self.v_proj(value), "b n (h d) -> b h n d", h=self.num_kv_heads)
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset)
        return q, k, v

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        out = F.dropout(rearrange(out, "b h n d -> b n (h d)"), p=self.dropout, training=self.training)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)

    def decode(self, x: torch.Tensor, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        """Causal self-attention of the new tokens ``x`` (B, n, E) after the ``cache`` of earlier keys and values
        (updated in place; empty dict to start). A prompt goes in whole (empty cache), later tokens one by one."""
        past = cache["k"].shape[2] if cache else 0
        if past and x.shape[1] != 1:
            raise ValueError(f"decode takes one token at a time after the prompt, got {x.shape[1]}")
        q, k, v = self._project(x, x, x, offset=past)
        if past:
            k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            out = dilated_attention_step(q, k, v, self.specs[True])
        else:
            out = dilated_attention(q, k, v, self.specs[True])
        cache["k"], cache["v"] = k, v
        return self._output(out)


class MultiheadCrossAttention(nn.Module):
    """Dense multi-head attention of ``query`` (B, Nq, E) over ``memory`` (B, Nk, E), for encoder–decoders.

    ``out_proj(LN(concat_h softmax(q_h k_hᵀ / sqrt(d)) v_h))`` with ``q = q_proj(query)``, ``k, v = k_proj(memory),
    v_proj(memory)``: dilated patterns are defined within one sequence, so attention from one sequence to another
    is dense, through ``F.scaled_dot_product_attention`` (flash or memory-efficient kernels on GPU). MAGNETO's
    sub-LayerNorm sits before the output projection; the init is Xavier-normal with gain 1 on all projections
    (torchscale's Decoder leaves ``encoder_attn`` out of the sub-LN gain). ``key_padding_mask`` (B, Nk) bool, True
    where a memory token is padding: those keys take no part in the softmax (the mask goes to SDPA, which then runs
    the memory-efficient kernel on GPU); a query whose memory is all padding gets attention 0 (as rows without keys
    do in `dilated_attention`), never NaN, and passes no gradient to that memory. ``dropout`` applies to the
    attention output before the sub-LayerNorm, in training mode, as in `MultiheadDilatedAttention`.
    ``forward(query, memory, mask)`` is ``attend(query, project_memory(memory), mask)``: decoding projects the memory
    to its keys and values once and attends each new token with `attend`.
    """

    gamma_init = 1.0  # read by the shared reset_parameters

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        sub_ln: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = dropout
        factory = dict(device=device, dtype=dtype)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(embed_dim, embed_dim, bias=bias, **factory) for _ in range(4)
        )
        self.norm = nn.LayerNorm(embed_dim, **factory) if sub_ln else None
        self.reset_parameters()

    reset_parameters = MultiheadDilatedAttention.reset_parameters
    _output = MultiheadDilatedAttention._output

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        for name, x in (("query", query), ("memory", memory)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must be (B, N, {self.embed_dim}), got {getattr(x, 'shape', x)!r}")
        if memory.shape[0] != query.shape[0] or memory.dtype != query.dtype:
            raise ValueError(
                f"memory must have the query's batch size and dtype ({query.shape[0]}, {query.dtype}), "
                f"got ({memory.shape[0]}, {memory.dtype})"
            )
        return self.attend(query, self.project_memory(memory), key_padding_mask)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``memory`` (B, Nk, E), each (B, H, Nk, d): projected once, they serve every
        `attend` over that memory (decoding: one projection per generate, not one per step)."""
        k = rearrange(self.k_proj(memory), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.v_proj(memory), "b n (h d) -> b h n d", h=self.num_heads)
        return k, v

    def attend(
        self,
        query: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` of ``query`` (B, Nq, E) with the memory's keys and values from `project_memory`."""
        k, v = memory_kv
        if query.dim() != 3 or query.shape[-1] != self.embed_dim or query.shape[0] != k.shape[0]:
            raise ValueError(f"query must be (B, N, {self.embed_dim}) with B = {k.shape[0]}, got {tuple(query.shape)}")
        q = rearrange(self.q_proj(query), "b n (h d) -> b h n d", h=self.num_heads)
        if key_padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            memory_shape = (k.shape[0], k.shape[2])
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != memory_shape:
                raise ValueError(
                    f"key_padding_mask must be a bool tensor of the memory's (B, N) = {memory_shape} "
                    f"(True = padding), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
            keep = ~key_padding_mask
            any_key = keep.any(dim=-1, keepdim=True)  # (B, 1)
            # a batch row without keys attends to all of them (no empty softmax, no NaN) and its output is zeroed:
            # the result and every gradient are exactly those of "no keys: output 0"
            allowed = (keep | ~any_key)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            out = out.masked_fill(~any_key[:, :, None, None], 0.0)
        return self._output(out)
