"""Hugging Face transformers integration: dilated attention as an ``attn_implementation``.

Usage::

    import flexdilated.hf
    from transformers import AutoModelForCausalLM
    name = flexdilated.hf.register("flexdilated", segment_lengths=(2048, 4096), dilation_rates=(1, 2))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)  # or .set_attn_implementation(name)
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32)

`register` adds one attention function to transformers' ``AttentionInterface`` and one mask function to its
``AttentionMaskInterface``, both under ``name``. Every layer of a model with that ``attn_implementation`` then
runs `flexdilated.dilated_attention` (causal iff the layer's ``is_causal``, default True; ``scaling`` is the scale).

Query rows, with ``L`` keys: ``Nq == L`` (prefill, training) the whole `dilated_attention`; one query against a cache
(decoding) `dilated_attention_step`; ``1 < Nq < L`` (chunked prefill, assisted decoding) the exact rows of the
dense reference for the queries at positions ``L - Nq .. L - 1`` (it reads only the keys of their segments).

Masks. Dilated attention can take causality (from the module) and key padding (``key_padding_mask``), nothing else.
Without a mask function registered under ``name``, transformers would hand the attention ``None`` and silently
drop padding; its ``sdpa``/``eager`` masks are dense (B, 1, Nq, Nk) tensors, O(N^2) memory at the lengths dilated
attention is for. So the mask function registered here returns, like the flash-attention one, either ``None`` (no
padding) or the 2-D bool keep-mask (B, L) (True = a real token) over key positions ``0 .. L - 1``, L = the query
offset + Nq: cache slots past L (a ``StaticCache``) are future keys, dropped. A plain causal or bidirectional mask
request is read without materialising anything. So is transformers' request for packed sequences (causal
attention with ``position_ids`` that restart, no ``attention_mask`` and no cache, as ``DataCollatorWithFlattening``
makes them): recognised by its parts, it is answered with the sequence ids it holds (`PackedSequences`), and the
attention attends each sequence alone (`dilated_attention`'s ``document_ids``: segments, offsets and causality from
each sequence's first token), where transformers asks for it and only there, as sdpa's and eager's masks do. Any
other request (sliding windows, chunked or block overlays, ``or``/``and`` mask functions) is built densely once
and accepted only if it equals causal (or bidirectional) + key padding, else a ``ValueError``. A 4-D mask given by the user reaches the attention
as is and is checked the same way (bool: True = attend; float: 0 = attend, ``-inf``/dtype min = masked).

Left padding. The pattern counts from each row's first real key (the first 1 of the 2-D mask, so a masked first
token shifts it too): the attention of a left-padded row is what it is alone, in training, prefill and decoding,
as dense attention's is (RoPE is relative; a model with absolute positions needs ``position_ids`` counted from the
first real token, as ``generate`` makes them). With the pattern laid on the padded index instead, a token's
segments would shift with the padding length. This differs from `flexdilated.dilated_attention`'s
``key_padding_mask`` (and the modules' and `LongNetEncoder`'s), which keeps the pattern on the index (SPEC §1). A
full forward rotates each row left by its padding (two gathers; the padding then sits at the end, masked as keys);
a call against a cache takes each row's padding as a document of its own (one call for all rows). Padding after
the first real key (holes, right padding) is removed from the keys where it lies. Causality is the module's alone:
a mask request is accepted if it is causal or bidirectional + padding, but which of the two it was is not checked
against ``is_causal``.

Raises ``ValueError`` for what it cannot express: ``dropout`` > 0 (training with ``attention_dropout``),
``sliding_window``, ``softcap``, attention sinks (``s_aux``), ``position_bias``, ``output_attentions``, and
flash attention's ``cu_seq_lens_q``/``cu_seq_lens_k`` without restarting ``position_ids``.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from .attention import dilated_attention, dilated_attention_step
from .reference import reference_rows
from .spec import DilatedSpec

__all__ = ["register"]

BUILTIN = ("eager", "sdpa", "flex_attention", "paged|eager")
UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")


def register(
    name: str = "flexdilated",
    *,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    heads: str = "all",
    overlap: str = "multiset",
) -> str:
    """Register dilated attention with transformers under ``name`` and return ``name``.

    The arguments are those of `flexdilated.DilatedSpec` but ``causal``, which each layer's ``is_causal`` sets.
    Registering a name again replaces its pattern (models read it at every call).
    """
    if not isinstance(name, str) or not name or "/" in name or name in BUILTIN or name.startswith("flash_attention"):
        raise ValueError(f"name must be a new attn_implementation name (no '/', not a built-in one), got {name!r}")
    specs = {
        causal: DilatedSpec(segment_lengths, dilation_rates, causal=causal, heads=heads, overlap=overlap)
        for causal in (False, True)
    }

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return dilated_attention_forward(module, query, key, value, attention_mask, specs, scaling, dropout, **kwargs)

    attention.__doc__ = (
        f"flexdilated.hf: dilated attention {specs[True].patterns}, heads={heads!r}, overlap={overlap!r}"
    )
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int = 0,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor | None:
    """The mask function (``AttentionMaskInterface``): ``None`` or the bool keep-mask (B, L) of the keys.

    Raises ``ValueError`` if the requested mask is not causal (or bidirectional) + key padding.
    """
    q_offset = int(q_offset)
    if kv_offset != 0:
        raise ValueError(
            f"flexdilated needs the keys at positions 0 .. L-1, got a cache with key offset {kv_offset} "
            "(a sliding-window cache layer?)"
        )
    length = q_offset + q_length
    if length > kv_length:
        raise ValueError(f"flexdilated: queries end at position {length - 1} but only {kv_length} keys are cached")
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    sequences = None if plain or attention_mask is not None else _packed_sequences(mask_function)
    if sequences is not None:
        return PackedSequences(sequences[:, :length])
    if attention_mask is None:
        keep = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    else:
        keep = prepare_padding_mask(attention_mask.bool(), length, 0)[:, :length]
    if not plain:
        dense = sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            use_vmap=kwargs.get("use_vmap", False),
            device=device,
        )
        if not any(torch.equal(dense, _expected(keep, q_length, kv_length, causal)) for causal in (True, False)):
            raise ValueError(
                "flexdilated can only apply causal (or bidirectional) attention + key padding, or packed sequences "
                "given by position_ids alone; this model asked for another mask (a sliding window, chunked/blockwise "
                "or custom mask functions, packing with an attention_mask), which dilated attention cannot express"
            )
    return None if length == kv_length and bool(keep.all()) else keep


class PackedSequences(NamedTuple):
    """What the mask function hands the attention for packed sequences: each token's sequence id (B, L)."""

    ids: torch.Tensor


def _packed_sequences(mask_function) -> torch.Tensor | None:
    """The sequence ids (B, L) if ``mask_function`` is what transformers' causal mask asks for packed sequences
    (``position_ids`` that restart, no ``attention_mask``, no cache): ``and_masks(causal on each sequence's own
    positions, same sequence)``, recognised by its parts; else None (a changed transformers falls back to the dense
    check, which raises)."""

    def parts(fn) -> dict:
        return inspect.getclosurevars(fn).nonlocals if inspect.isfunction(fn) else {}

    functions = parts(mask_function).get("mask_functions")
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask" or not isinstance(functions, tuple):
        return None
    names = [getattr(f, "__qualname__", "") for f in functions]
    if names != ["remap_positions_for_packed_sequence.<locals>.inner_mask",
                 "packed_sequence_mask_function.<locals>.inner_mask"]:
        return None
    ids = parts(functions[1]).get("packed_sequence_mask")
    causal = parts(functions[0]).get("mask_function") is causal_mask_function
    return ids if causal and isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _expected(keep: torch.Tensor, q_length: int, kv_length: int, causal: bool) -> torch.Tensor:
    """Causal (or not) + key padding as a dense (B, 1, Nq, Nk) bool mask: the keep-mask ``keep`` (B, L) covers
    keys 0 .. L-1 (keys past L are masked) and the queries are at positions L - Nq .. L - 1."""
    length = keep.shape[1]
    t = torch.arange(kv_length, device=keep.device)
    p = torch.arange(length - q_length, length, device=keep.device)[:, None]
    ok = (t <= p) if causal else (t < length).expand(q_length, kv_length)
    ok = ok & torch.nn.functional.pad(keep, (0, kv_length - length))[:, None, None, :]
    return ok


def _key_padding(mask, batch: int, q_length: int, kv_length: int, causal: bool) -> tuple[torch.Tensor | None, int]:
    """``attention_mask`` as (key_padding_mask or None, L): True = padding, over keys 0 .. L-1."""
    if mask is None:
        return None, kv_length
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"flexdilated: unsupported attention_mask of type {type(mask).__name__}")
    if mask.dim() == 2:
        if mask.shape[0] != batch or not q_length <= mask.shape[1] <= kv_length:
            raise ValueError(
                f"flexdilated: a 2-D attention_mask must be (B, L) with {q_length} <= L <= {kv_length}, "
                f"got {tuple(mask.shape)}"
            )
        pad = ~mask.bool()
        return (pad if bool(pad.any()) else None), mask.shape[1]
    if mask.dim() != 4 or mask.shape[-2:] != (q_length, kv_length):
        raise ValueError(
            f"flexdilated: attention_mask must be None, (B, L) or (B, 1|H, {q_length}, {kv_length}), "
            f"got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        ok = mask
    else:
        masked = (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)
        if not bool(((mask == 0) | masked).all()):
            raise ValueError("flexdilated: a float attention_mask may hold only 0 and -inf (or dtype min): no biases")
        ok = ~masked
    keep = ok[:, :, -1, :].all(1)  # the last query sees every key under causality
    ok, keep = ok.expand(batch, -1, -1, -1), keep.expand(batch, kv_length)
    if not torch.equal(ok, _expected(keep, q_length, kv_length, causal).expand_as(ok)):
        raise ValueError(
            f"flexdilated: the 4-D attention_mask is not {'causal' if causal else 'full'} attention + key padding, "
            "which is all dilated attention can apply"
        )
    pad = ~keep
    return (pad if bool(pad.any()) else None), kv_length


def dilated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    specs: dict[bool, DilatedSpec],
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function: query (B, H, Nq, D), key/value (B, Hkv, Nk, D) -> ((B, Nq, H, D), None)."""
    if dropout:
        raise ValueError(
            f"flexdilated has no attention dropout, got dropout={dropout} (set config.attention_dropout = 0.0, "
            "or call model.eval())"
        )
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"flexdilated cannot apply {name}={kwargs[name]!r} (set it to None in the config)")
    if kwargs.get("output_attentions"):
        raise ValueError("flexdilated does not return attention weights: output_attentions needs 'eager'")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    spec = specs[causal]
    Nq = query.shape[2]
    if isinstance(attention_mask, PackedSequences):  # each sequence alone (transformers asks only without a cache)
        ids = attention_mask.ids.expand(query.shape[0], -1)
        if Nq != key.shape[2] or ids.shape[1] != Nq:
            raise ValueError(f"flexdilated: packed sequences need as many queries as keys and ids, got {Nq}, "
                             f"{key.shape[2]} and {ids.shape[1]}")
        out = dilated_attention(query, key, value, spec, scale=scaling, document_ids=ids)
        return out.transpose(1, 2).contiguous(), None
    if any(kwargs.get(f"cu_seq_lens_{x}") is not None for x in "qk"):
        raise ValueError(
            "flexdilated takes packed sequences from position_ids that restart (no attention_mask), not from "
            "cu_seq_lens_q/k alone: pass position_ids (DataCollatorWithFlattening(return_position_ids=True))"
        )
    pad, length = _key_padding(attention_mask, query.shape[0], Nq, key.shape[2], causal)
    key, value = key[:, :, :length], value[:, :, :length]  # past L: empty cache slots, future keys
    starts = None if pad is None else (~pad).int().argmax(1)  # each row's first real key (0 if it has none)
    if starts is None or not bool(starts.any()):
        out = _attend(query, key, value, spec, scaling, pad, causal)
    elif Nq == length:  # rotated left by the padding, which then sits at the end: each row as if alone
        ahead = (torch.arange(length, device=query.device) + starts[:, None]) % length  # (B, L)
        back = (torch.arange(length, device=query.device) - starts[:, None]) % length
        rotate = lambda x, index: x.gather(2, index[:, None, :, None].expand_as(x))  # noqa: E731
        out = _attend(*(rotate(x, ahead) for x in (query, key, value)), spec, scaling, pad.gather(1, ahead), causal)
        out = rotate(out, back)
    elif not causal:
        raise ValueError(f"flexdilated: non-causal attention needs as many queries as keys, got {Nq} and {length}")
    else:  # against a cache, each row's padding a document of its own: positions count from its first real key
        first = max(0, length - Nq + 1 - max(spec.segment_lengths))  # the earliest key any row's segments hold
        ids = (torch.arange(length, device=query.device) >= starts[:, None]).long()
        rows, keys = (torch.arange(a, length, device=query.device) for a in (length - Nq, first))
        out, _ = reference_rows(query, key[:, :, first:], value[:, :, first:], spec, rows, scaling, pad[:, first:],
                                key_positions=keys, document_ids=ids)
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, spec: DilatedSpec, scaling, pad, causal: bool) -> torch.Tensor:
    """Queries at positions L - Nq .. L - 1 against the L keys, (B, H, Nq, D)."""
    Nq, length = query.shape[2], key.shape[2]
    if Nq == length:
        out = dilated_attention(query, key, value, spec, scale=scaling, key_padding_mask=pad)
    elif not causal:
        raise ValueError(f"flexdilated: non-causal attention needs as many queries as keys, got {Nq} and {length}")
    elif Nq == 1 and pad is None:
        out = dilated_attention_step(query, key, value, spec, scale=scaling)
    else:  # the exact rows L-Nq .. L-1, reading only the keys of their segments
        first = length - Nq
        start = min(first - first % w for w in spec.segment_lengths)
        rows = torch.arange(first, length, device=query.device)
        keys = torch.arange(start, length, device=query.device)
        pad = None if pad is None else pad[:, start:]
        out, _ = reference_rows(
            query, key[:, :, start:], value[:, :, start:], spec, rows, scaling, pad, key_positions=keys
        )
    return out
