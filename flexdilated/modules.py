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

from .attention import _is_dtensor, dilated_attention, dilated_attention_step
from .documents import check_document_ids, positions_in_document
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
    returns ``(out, None)``. ``key_padding_mask`` (B, N), True (or -inf) where a key is padding, is composed with
    the pattern. It serves as ``self_attn`` of ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, their
    stacks and ``nn.Transformer`` (assign it; the layers' fused fast path is ruled out, see ``forward``).
    ``dropout`` applies to the attention output (B, N, E) before the sub-LayerNorm and the output
    projection, in training mode: FlexAttention has no dropout on the attention probabilities.
    ``num_kv_heads`` < ``num_heads`` gives grouped-query attention; ``rotary`` rotates q and k by their positions.
    ``decode`` attends new tokens against a cache of the keys and values before them (causal generation).
    A DTensor query sharded along the sequence (``Shard(1)`` on a 1-D mesh) runs sequence-parallel, exchanging the
    keys of segments that span shards by ``sequence_parallel`` (``"all_gather"`` or ``"ring"``, `distributed.py`).
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
        sequence_parallel: str = "all_gather",
    ) -> None:
        super().__init__()
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        if sequence_parallel not in ("all_gather", "ring"):
            raise ValueError(f"sequence_parallel must be 'all_gather' or 'ring', got {sequence_parallel!r}")
        self.sequence_parallel = sequence_parallel
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

    # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder to choose PyTorch's fused fast path, which would
    # bypass this module: separate q, k, v projections rule it out, as for nn.MultiheadAttention with kdim != E.
    _qkv_same_embed_dim = False

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The q, k and v projection weights stacked ((E + 2 * kv_dim, E)), as in ``nn.MultiheadAttention``."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> torch.Tensor:
        """Their biases stacked (zeros with ``bias=False``)."""
        if self.q_proj.bias is None:
            return self.q_proj.weight.new_zeros(self.q_proj.out_features + 2 * self.k_proj.out_features)
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``nn.MultiheadAttention``'s call for self-attention: (B, N, E) (``batch_first``), (N, B, E) or
        unbatched (N, E); nested tensors (``nn.TransformerEncoder``'s inference path) too.

        ``key_padding_mask`` (B, N): bool, True = padding, or float 0 / -inf (PyTorch's canonical form).
        ``attn_mask`` may only be the causal mask ((N, N) or (B * H, N, N); bool True above the diagonal, or float
        -inf above and 0 elsewhere, as ``nn.Transformer.generate_square_subsequent_mask`` makes it): it means
        ``is_causal=True``. Any other dense mask raises: it would defeat the pattern. ``document_ids`` (B, N):
        packed documents, each attended alone (rotary positions restart at each document)."""
        if need_weights:
            raise ValueError("need_weights=True is not supported: dilated attention never forms the (N, N) weights")
        if (query.is_nested or _is_dtensor(query)) and document_ids is not None:
            raise ValueError("document_ids are supported for plain (B, N, E) or (N, E) tensors")
        if query.is_nested:
            return self._forward_nested(query, key, value, attn_mask, is_causal), None
        if _is_dtensor(query):
            return self._forward_sequence_parallel(query, key, value, key_padding_mask, attn_mask, is_causal), None
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if document_ids is not None:
                document_ids = document_ids.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must be (B, N, {self.embed_dim}) or unbatched (N, {self.embed_dim}), got shape "
                    f"{tuple(x.shape[1:] if unbatched else x.shape)}"
                )
        if key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
            raise ValueError(
                f"key and value must have the query's batch and length {tuple(query.shape[:2])} (self-attention), "
                f"got {tuple(key.shape[:2])} and {tuple(value.shape[:2])}"
            )
        causal = _causal_from_mask(attn_mask, bool(is_causal), query.shape[1])
        positions = None
        if document_ids is not None and self.rotary is not None:
            check_document_ids(document_ids, *query.shape[:2], query.device)
            positions = positions_in_document(document_ids)
        q, k, v = self._project(query, key, value, offset=0, positions=positions)
        out = dilated_attention(
            q, k, v, self.specs[causal], key_padding_mask=_bool_padding(key_padding_mask), document_ids=document_ids
        )
        out = self._output(out)
        if unbatched:
            return out[0], None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _forward_sequence_parallel(self, query, key, value, key_padding_mask, attn_mask, is_causal: bool):
        """DTensor (B, N, E) sharded along the sequence (``Shard(1)``) over a 1-D mesh: projections on the local
        shard (rotary positions from the shard's first token), `distributed.sequence_parallel_attention` with
        ``self.sequence_parallel`` as the algorithm; the result is a DTensor placed like the query."""
        from torch.distributed.tensor import DTensor, Shard

        from .distributed import sequence_parallel_attention

        if key is not query or value is not query or not self.batch_first:
            raise ValueError("sequence-parallel attention takes batch_first self-attention (query is key is value)")
        if query.device_mesh.ndim != 1 or tuple(query.placements) != (Shard(1),):
            raise ValueError(
                f"query must be sharded along the sequence, placements (Shard(1),) on a 1-D mesh, got "
                f"{tuple(query.placements)} on a {query.device_mesh.ndim}-D mesh"
            )
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("key_padding_mask and attn_mask are not supported with sequence-parallel (DTensor) input")
        mesh, x = query.device_mesh, query.to_local()
        q, k, v = self._project(x, x, x, offset=mesh.get_local_rank() * x.shape[1])
        spec = self.specs[bool(is_causal)]
        out = sequence_parallel_attention(q, k, v, spec, mesh.get_group(), algorithm=self.sequence_parallel)
        return DTensor.from_local(self._output(out), mesh, query.placements, run_check=False)

    def _forward_nested(self, query, key, value, attn_mask, is_causal: bool) -> torch.Tensor:
        """Nested (B, N_b, E) input, as ``nn.TransformerEncoder`` builds it from a padding mask in inference: run
        padded with the padding as keys that take no part, and hand back a nested tensor of the same lengths."""
        if not self.batch_first or key is not query or value is not query:
            raise ValueError("nested tensors are supported for batch_first self-attention (query is key is value)")
        lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
        padded = query.to_padded_tensor(0.0)
        keep = torch.arange(padded.shape[1], device=query.device) < lengths[:, None]
        out, _ = self.forward(padded, padded, padded, key_padding_mask=~keep, attn_mask=attn_mask, is_causal=is_causal)
        return torch._nested_tensor_from_mask(out, keep, mask_check=False)

    def _project(self, query, key, value, offset: int, positions: torch.Tensor | None = None):
        q = rearrange(self.q_proj(query), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(key), "b n (h d) -> b h n d", h=self.num_kv_heads)
        v = rearrange(self.v_proj(value), "b n (h d) -> b h n d", h=self.num_kv_heads)
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset, positions)
        return q, k, v

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        out = F.dropout(rearrange(out, "b h n d -> b n (h d)"), p=self.dropout, training=self.training)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)

    def decode(self, x: torch.Tensor, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        """Causal self-attention of the new tokens ``x`` (B, n, E) after the ``cache`` of earlier keys and values
        (updated in place; empty dict to start). A prompt goes in whole (empty cache), later tokens one by one.

        Left padding: ``cache["starts"]`` (B,) ints, set before the prompt, says that row b's first ``starts[b]``
        tokens are padding. Each row then attends as if it began at ``starts[b]``: positions, segments and keys
        count from there (the padding is a document of its own in the prompt, and no key of later tokens)."""
        past = cache["k"].shape[2] if "k" in cache else 0
        if past and x.shape[1] != 1:
            raise ValueError(f"decode takes one token at a time after the prompt, got {x.shape[1]}")
        starts, spec = cache.get("starts"), self.specs[True]
        if starts is None:
            q, k, v = self._project(x, x, x, offset=past)
            if past:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
                out = dilated_attention_step(q, k, v, spec)
            else:
                out = dilated_attention(q, k, v, spec)
        elif not past:
            ids = (torch.arange(x.shape[1], device=x.device) >= starts[:, None]).long()  # the padding: document 0
            q, k, v = self._project(x, x, x, offset=0, positions=positions_in_document(ids))
            out = dilated_attention(q, k, v, spec, document_ids=ids)
        else:
            q, k, v = self._project(x, x, x, offset=0, positions=(past - starts)[:, None])
            k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            out = dilated_attention_step(q, k, v, spec, starts=starts)
        cache["k"], cache["v"] = k, v
        return self._output(out)


def _bool_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A key padding mask as bool (True = padding) from bool or PyTorch's float form (0 = key, -inf = padding)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"key_padding_mask must be bool (True = padding) or float (0 / -inf), got {mask.dtype}")
    padding = mask == float("-inf")
    if not torch.compiler.is_compiling() and not bool((padding | (mask == 0)).all()):
        raise ValueError(
            "a float key_padding_mask may hold only 0 (key) and -inf (padding): an additive bias is not supported"
        )
    return padding


def _causal_from_mask(attn_mask: torch.Tensor | None, is_causal: bool, seq_len: int) -> bool:
    """Whether to attend causally: ``is_causal``, or an ``attn_mask`` that is exactly the causal mask (which
    ``nn.TransformerDecoderLayer`` passes together with ``is_causal=True``). Any other mask raises."""
    if attn_mask is None:
        return is_causal
    if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape[-2:]) != (seq_len, seq_len):
        raise ValueError(
            f"attn_mask must be the causal mask of shape (N, N) or (B * num_heads, N, N) with N = {seq_len}, "
            f"got shape {tuple(attn_mask.shape)}"
        )
    if torch.compiler.is_compiling():  # the mask's values cannot be read inside a graph: trust the hint
        if not is_causal:
            raise ValueError("under torch.compile an attn_mask is accepted only with is_causal=True (the causal hint)")
        return True
    above = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        causal = bool((attn_mask == above).all())
    else:
        causal = bool(((attn_mask == float("-inf")) == above).all() and (attn_mask.masked_fill(above, 0) == 0).all())
    if not causal:
        raise ValueError(
            "attn_mask is not supported unless it is exactly the causal mask (a dense mask defeats the pattern): "
            "use is_causal=True or key_padding_mask"
        )
    return True


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
