"""LongNet models assembled from `MultiheadDilatedAttention`.

`LongNetLM`: the decoder-only causal LM of the paper. `LongNetEncoder`: the bidirectional stack, for embeddings or
classification. `LongNet`: encoder–decoder (dilated self-attention on both sides, dense cross-attention).

All are stacks of pre-LN `Block`s with MAGNETO's sub-LayerNorms (Wang et al., 2022, "Foundation Transformers",
arXiv:2210.06423; inside the attention before its output projection, inside the feed-forward before its second
linear) and its init: Xavier-normal scaled by a gain γ on the value/output projections and the feed-forward
weights. γ depends on the architecture (MAGNETO Fig. 2; torchscale ``Encoder``/``Decoder`` with ``subln``), with N
encoder and M decoder layers:

    decoder-only (LongNetLM), encoder-only (LongNetEncoder)   γ = sqrt(log(2·depth))
    encoder of an encoder–decoder (LongNet)                   γ = sqrt(log(3M) · log(2N) / 3)
    decoder of an encoder–decoder (LongNet)                   γ = sqrt(log(3M)); cross-attention γ = 1

RoPE positions by default, XPOS (the paper's) with ``position="xpos"`` in the causal LM for sequences up to ≈36k
tokens (`positions.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import _is_dtensor
from .modules import MultiheadCrossAttention, MultiheadDilatedAttention, _positive_int
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


class Block(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))``, with ``cross`` then ``x + cross(LN(x), memory)``, then ``x + ffn(LN(x))``.

    ``attn`` is dilated self-attention (causal or not, ``key_padding_mask`` on its keys, or ``decode`` with a KV
    cache); ``cross`` is dense attention to ``memory`` (the encoder's output), ``memory_padding_mask`` on its keys,
    or to ``memory_kv``, the memory's keys and values from ``cross.project_memory`` (decoding).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        segment_lengths,
        dilation_rates,
        *,
        causal: bool,
        cross: bool = False,
        ff_mult: int,
        dropout: float,
        gain: float,
        rotary: RotaryEmbedding | None,
        **attn,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.attn_norm, self.ff_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiheadDilatedAttention(
            dim, num_heads, segment_lengths, dilation_rates, dropout=dropout, gamma_init=gain, rotary=rotary, **attn
        )
        self.ff = FeedForward(dim, ff_mult * dim, dropout, gain)
        self.cross_norm = nn.LayerNorm(dim) if cross else None
        self.cross = MultiheadCrossAttention(dim, num_heads, dropout=dropout) if cross else None

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        sequence_mesh=None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        if sequence_mesh is not None:  # x is this rank's shard of the sequence: only the attention communicates
            from torch.distributed.tensor import DTensor, Shard

            h = DTensor.from_local(h, sequence_mesh, [Shard(1)], run_check=False)
            x = x + self.attn(h, h, h, is_causal=self.causal)[0].to_local()
        elif cache is None:
            attn = dict(key_padding_mask=key_padding_mask, is_causal=self.causal, document_ids=document_ids)
            x = x + self.attn(h, h, h, **attn)[0]
        else:
            x = x + self.attn.decode(h, cache)
        if self.cross is not None:
            h = self.cross_norm(x)
            if memory_kv is None:
                x = x + self.cross(h, memory, memory_padding_mask)
            else:
                x = x + self.cross.attend(h, memory_kv, memory_padding_mask)
        return x + self.ff(self.ff_norm(x))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool, **kwargs) -> torch.Tensor:
    """``x`` through the blocks; with ``checkpointing`` each block's activations are recomputed in backward."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointing else block(x, **kwargs)
    return x


def _stack(vocab_size: int, depth: int, dim: int, num_heads: int, segment_lengths, dilation_rates, **block):
    """What every model here is made of: the token embedding, ``depth`` `Block`s and the final LayerNorm."""
    blocks = (Block(dim, num_heads, segment_lengths, dilation_rates, **block) for _ in range(depth))
    return _embedding(vocab_size, dim), nn.ModuleList(blocks), nn.LayerNorm(dim)


def _embedding(num: int, dim: int) -> nn.Embedding:
    embed = nn.Embedding(num, dim)
    nn.init.normal_(embed.weight, std=dim**-0.5)
    return embed


def _check_model_args(dim: int, num_heads: int, **sizes: int) -> None:
    for name, value in dict(sizes, dim=dim, num_heads=num_heads).items():
        _positive_int(name, value)
    if dim % num_heads:
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")


def _sequence_mesh(tokens):
    """The 1-D mesh a DTensor of tokens is sharded over along the sequence (``Shard(1)``)."""
    from torch.distributed.tensor import Shard

    if tokens.device_mesh.ndim != 1 or tuple(tokens.placements) != (Shard(1),):
        raise ValueError(
            f"tokens must be sharded along the sequence, placements (Shard(1),) on a 1-D mesh, got "
            f"{tuple(tokens.placements)} on a {tokens.device_mesh.ndim}-D mesh"
        )
    return tokens.device_mesh


def _check_tokens(name: str, tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name} must be an int tensor (B, N), got {tuple(getattr(tokens, 'shape', ()))} "
            f"{getattr(tokens, 'dtype', type(tokens).__name__)}"
        )


def _check_pair(src: torch.Tensor, tgt: torch.Tensor, tgt_name: str) -> None:
    _check_tokens("src", src)
    _check_tokens(tgt_name, tgt)
    if tgt.shape[0] != src.shape[0]:
        raise ValueError(f"src and {tgt_name} must have the same batch size, got {src.shape[0]} and {tgt.shape[0]}")


def _check_padding_mask(name: str, mask: torch.Tensor | None, tokens: torch.Tensor) -> None:
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != tokens.shape
    ):
        raise ValueError(
            f"{name} must be a bool tensor shaped like its tokens {tuple(tokens.shape)} (True = padding), "
            f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
        )


def _check_generate_args(max_new_tokens, temperature, top_k, vocab_size: int, eos_token=None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= vocab_size):
        raise ValueError(f"top_k must be None or an int in [1, {vocab_size}], got {top_k!r}")
    if eos_token is not None and (
        isinstance(eos_token, bool) or not isinstance(eos_token, int) or not 0 <= eos_token < vocab_size
    ):
        raise ValueError(f"eos_token must be None or a token id in [0, {vocab_size}), got {eos_token!r}")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """The next token (B, 1) from the last logits (B, vocab): argmax for temperature 0, else a sample of
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def _decode(step, caches: list[dict], prefix: torch.Tensor, max_new_tokens: int, temperature: float,
            top_k: int | None, generator, eos_token: int | None) -> torch.Tensor:
    """The generation loop of both models: ``step(tokens, caches)`` -> logits, the prefix whole, then each sampled
    token; with ``eos_token`` finished rows repeat it and the loop stops once all are finished."""
    tokens, new = prefix, prefix
    done = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
    for _ in range(max_new_tokens):
        new = _sample(step(new, caches)[:, -1].float(), temperature, top_k, generator).to(tokens.dtype)
        if eos_token is not None:
            new = new.masked_fill(done[:, None], eos_token)
            done |= new[:, 0] == eos_token
        tokens = torch.cat((tokens, new), dim=1)
        if eos_token is not None and bool(done.all()):
            break
    return tokens


def _rotary(position: str | None, head_dim: int, causal: bool) -> RotaryEmbedding | None:
    allowed = ("xpos", "rope", None) if causal else ("rope", None)
    if position not in allowed:
        why = " (XPOS's decay assumes keys before the query: causal attention only)" if position == "xpos" else ""
        raise ValueError(f"position must be one of {allowed}, got {position!r}{why}")
    return None if position is None else RotaryEmbedding(head_dim, xpos=position == "xpos")


class LongNetLM(nn.Module):
    """Decoder-only causal LM: ``forward(tokens (B, N)) -> logits (B, N, vocab)``; `loss`, `generate`.

    ``head(LN(blocks(embed(tokens))))``, causal dilated self-attention, MAGNETO gain ``sqrt(log(2 · depth))``."""

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
        _check_model_args(dim, num_heads, vocab_size=vocab_size, depth=depth)
        rotary = _rotary(position, dim // num_heads, causal=True)
        self.embed, self.blocks, self.norm = _stack(
            vocab_size, depth, dim, num_heads, segment_lengths, dilation_rates, causal=True, ff_mult=ff_mult,
            dropout=dropout, gain=math.sqrt(math.log(2 * depth)), rotary=rotary, num_kv_heads=num_kv_heads,
            heads=heads, overlap=overlap,
        )
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.checkpointing = checkpointing

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, N, vocab). ``document_ids`` (B, N), non-decreasing: packed documents, each one as if alone
        (attention and rotary positions restart at its first token). Sequence parallel: ``tokens`` a DTensor
        sharded along the sequence (``Shard(1)`` on a 1-D mesh) gives logits sharded the same way; each rank
        computes its shard, the attention exchanges what spans shards (`MultiheadDilatedAttention`)."""
        if _is_dtensor(tokens):
            from torch.distributed.tensor import DTensor, Shard

            mesh = _sequence_mesh(tokens)
            local = tokens.to_local()
            _check_tokens("tokens", local)
            x = _run_blocks(
                self.blocks, self.embed(local), self.checkpointing and self.training, sequence_mesh=mesh
            )
            return DTensor.from_local(self.head(self.norm(x)), mesh, [Shard(1)], run_check=False)
        _check_tokens("tokens", tokens)
        x = _run_blocks(
            self.blocks, self.embed(tokens), self.checkpointing and self.training, document_ids=document_ids
        )
        return self.head(self.norm(x))

    def loss(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy: of ``targets`` given ``tokens`` (both (B, N)), or without ``targets``
        predicting tokens[:, 1:] from tokens[:, :-1]. With ``document_ids`` (packed documents, (B, N) like
        ``tokens``) and no ``targets``, the first token of a document is not predicted from the previous one's end.

        Sequence parallel (``tokens`` and ``targets`` DTensors sharded along the sequence): a DTensor with a
        ``Partial`` placement — each rank holds its tokens' share of the mean, ``.full_tensor()`` is the loss.
        Its backward leaves each rank with its share of every parameter's gradient: sum them over the mesh (what
        data parallelism over the same ranks does), e.g. ``dist.all_reduce(p.grad)``."""
        if targets is None:
            if _is_dtensor(tokens):
                raise ValueError("sequence-parallel loss needs targets: shifting tokens would cross shards")
            tokens, targets = tokens[:, :-1], tokens[:, 1:]
            if document_ids is not None:
                if not isinstance(document_ids, torch.Tensor) or document_ids.shape != targets.shape[:1] + (
                    targets.shape[1] + 1,
                ):
                    raise ValueError(
                        f"document_ids must be shaped like the tokens, got {getattr(document_ids, 'shape', None)}"
                    )
                same = document_ids[:, 1:] == document_ids[:, :-1]
                targets, document_ids = targets.masked_fill(~same, -100), document_ids[:, :-1]
        if _is_dtensor(tokens):
            from torch.distributed.tensor import DTensor, Partial

            if not _is_dtensor(targets) or targets.shape != tokens.shape or targets.placements != tokens.placements:
                raise ValueError(
                    f"targets must be a DTensor shaped and placed like tokens {tuple(tokens.shape)}, "
                    f"{tokens.placements}"
                )
            logits = self(tokens).to_local()
            share = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.to_local().flatten(), reduction="sum"
            ) / targets.numel()
            return DTensor.from_local(share, tokens.device_mesh, [Partial()], run_check=False)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
        logits = self(tokens, document_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        prompt_padding_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_token: int | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (B, P) with a KV cache; temperature 0 is greedy, ``top_k``
        keeps the k likeliest. ``prompt_padding_mask`` (B, P) bool, True on a prefix of each row: left padding, for
        prompts of different lengths; each row is generated as if its prompt were alone (positions, segments and
        keys count from its first real token; greedy decoding gives each row what it gives unbatched). With
        ``eos_token``, a row that has produced it produces only it after, and generation stops once every row has.
        Returns (B, P + n), n = max_new_tokens unless stopped early."""
        _check_tokens("prompt", prompt)
        if prompt.shape[1] == 0:
            raise ValueError("prompt must hold at least one token, got length 0")
        _check_padding_mask("prompt_padding_mask", prompt_padding_mask, prompt)
        _check_generate_args(max_new_tokens, temperature, top_k, self.head.out_features, eos_token)
        caches: list[dict] = [{} for _ in self.blocks]
        if prompt_padding_mask is not None:
            starts = prompt_padding_mask.sum(1)
            if not torch.equal(torch.arange(prompt.shape[1], device=prompt.device) < starts[:, None], prompt_padding_mask):
                raise ValueError("prompt_padding_mask must mark left padding: True on a prefix of each row, then False")
            if bool((starts == prompt.shape[1]).any()):
                raise ValueError("prompt_padding_mask leaves a row without a real token: each prompt needs one")
            if bool(starts.any()):
                caches = [{"starts": starts} for _ in self.blocks]
        return _decode(self.step, caches, prompt, max_new_tokens, temperature, top_k, generator, eos_token)

    def step(self, tokens: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Logits of ``tokens`` (B, n) following the cached ones (the whole prompt first, then one at a time);
        ``caches`` one dict per block, empty to start (or with the left padding's ``starts``,
        `MultiheadDilatedAttention.decode`)."""
        x = self.embed(tokens)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache=cache)
        return self.head(self.norm(x))


class LongNetEncoder(nn.Module):
    """Bidirectional LongNet encoder: ``forward(tokens (B, N), key_padding_mask=None) -> hidden (B, N, dim)``.

    ``LN(blocks(embed(tokens)))``, each block ``x + attn(LN(x))``, ``x + ffn(LN(x))`` with non-causal dilated
    self-attention. ``key_padding_mask`` (B, N) bool, True where a token is padding: padding is no key of any
    attention, so the states of the real tokens do not depend on it (the states at padded positions mean nothing).
    MAGNETO gain ``gamma_init``, by default ``sqrt(log(2 · depth))`` (encoder-only); `LongNet` passes its
    encoder–decoder gain. Positions: RoPE or none (XPOS's decay assumes keys before the query, i.e. causal).

    Embeddings and classification: pool the states of the real tokens, e.g. the masked mean
    ``(h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)`` with ``keep = ~key_padding_mask`` (or ``h.mean(1)``
    without padding), or the state of a leading [CLS] token ``h[:, 0]``, and put ``nn.Linear(dim, classes)`` on it.
    """

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
        heads: str = "all",
        overlap: str = "multiset",
        checkpointing: bool = False,
        gamma_init: float | None = None,
    ) -> None:
        super().__init__()
        _check_model_args(dim, num_heads, vocab_size=vocab_size, depth=depth)
        rotary = _rotary(position, dim // num_heads, causal=False)
        gain = math.sqrt(math.log(2 * depth)) if gamma_init is None else gamma_init
        self.embed, self.blocks, self.norm = _stack(
            vocab_size, depth, dim, num_heads, segment_lengths, dilation_rates, causal=False, ff_mult=ff_mult,
            dropout=dropout, gain=gain, rotary=rotary, num_kv_heads=num_kv_heads, heads=heads, overlap=overlap,
        )
        self.checkpointing = checkpointing

    def forward(
        self,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, N, dim); ``document_ids`` (B, N), non-decreasing: packed documents, each as if alone."""
        _check_tokens("tokens", tokens)
        _check_padding_mask("key_padding_mask", key_padding_mask, tokens)
        x = _run_blocks(
            self.blocks, self.embed(tokens), self.checkpointing and self.training, key_padding_mask=key_padding_mask,
            document_ids=document_ids,
        )
        return self.norm(x)


class LongNet(nn.Module):
    """Encoder–decoder: ``forward(src (B, Ns), tgt (B, Nt), src_key_padding_mask=None, tgt_key_padding_mask=None)
    -> logits (B, Nt, tgt_vocab)``; `loss`, `generate` (with `init_caches` and `step`).

    ``memory = LongNetEncoder(src)``; the decoder is ``head(LN(blocks(embed(tgt))))``, each block causal dilated
    self-attention, dense cross-attention to ``memory`` (`MultiheadCrossAttention`: ``src_key_padding_mask`` keys
    take no part in it) and the feed-forward: the structure of dilated-attention-pytorch's LongNet, with residual
    connections, dense cross-attention (a dilated pattern relates positions of one sequence) and MAGNETO's
    encoder–decoder gains (module docstring). ``tgt_key_padding_mask`` (B, Nt) bool, True = padding, removes those
    target tokens from the keys of the decoder's self-attention (left padding then never reaches the real tokens;
    the logits at padded positions mean nothing), and `loss` leaves them out. ``tie_embeddings`` ties the decoder's
    input and output embeddings. ``num_kv_heads`` (GQA), ``position`` (RoPE or none: XPOS is for the causal LM
    only), ``heads`` and ``overlap`` apply to the dilated self-attentions; ``checkpointing`` recomputes the
    activations of every block, encoder's and decoder's, in backward.

    `generate` encodes ``src`` once, projects the memory to each layer's cross-attention keys and values once
    (`init_caches`), then decodes with the self-attention KV cache of `MultiheadDilatedAttention.decode` (the target
    prefix whole, then one token at a time, `step`): its logits equal those of `forward` on the generated sequence.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        dim: int,
        encoder_depth: int,
        decoder_depth: int,
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
        _check_model_args(
            dim, num_heads, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
            encoder_depth=encoder_depth, decoder_depth=decoder_depth,
        )
        rotary = _rotary(position, dim // num_heads, causal=False)
        attn = dict(num_kv_heads=num_kv_heads, heads=heads, overlap=overlap)
        log_3m, log_2n = math.log(3 * decoder_depth), math.log(2 * encoder_depth)
        self.encoder = LongNetEncoder(
            src_vocab_size, dim, encoder_depth, num_heads, segment_lengths, dilation_rates, ff_mult=ff_mult,
            dropout=dropout, position=position, gamma_init=math.sqrt(log_3m * log_2n / 3), **attn,
        )
        self.embed, self.blocks, self.norm = _stack(
            tgt_vocab_size, decoder_depth, dim, num_heads, segment_lengths, dilation_rates, causal=True, cross=True,
            ff_mult=ff_mult, dropout=dropout, gain=math.sqrt(log_3m), rotary=rotary, **attn,
        )
        self.head = nn.Linear(dim, tgt_vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> bool:
        return self.encoder.checkpointing

    @checkpointing.setter
    def checkpointing(self, value: bool) -> None:
        self.encoder.checkpointing = value

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_pair(src, tgt, "tgt")
        _check_padding_mask("src_key_padding_mask", src_key_padding_mask, src)
        _check_padding_mask("tgt_key_padding_mask", tgt_key_padding_mask, tgt)
        memory = self.encoder(src, src_key_padding_mask)
        x = _run_blocks(
            self.blocks, self.embed(tgt), self.checkpointing and self.training,
            key_padding_mask=tgt_key_padding_mask, memory=memory, memory_padding_mask=src_key_padding_mask,
        )
        return self.head(self.norm(x))

    def loss(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy with teacher forcing: predict tgt[:, 1:] from src and tgt[:, :-1] (tgt starts with a
        start token). With ``tgt_key_padding_mask`` (B, Nt) the mean is over the real target tokens only: a target
        counts where neither it nor its input token (the one before it) is padding, so padding is never predicted
        and, with left padding, the start token is not predicted from padding. No real target at all gives 0."""
        _check_tokens("tgt", tgt)
        _check_padding_mask("tgt_key_padding_mask", tgt_key_padding_mask, tgt)
        if tgt_key_padding_mask is None:
            logits = self(src, tgt[:, :-1], src_key_padding_mask)
            return F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten())
        pad = tgt_key_padding_mask
        logits = self(src, tgt[:, :-1], src_key_padding_mask, pad[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten(), reduction="none")
        keep = ~(pad[:, 1:] | pad[:, :-1]).flatten()
        return losses.masked_fill(~keep, 0.0).sum() / keep.sum().clamp(min=1)

    @torch.no_grad()
    def generate(
        self,
        src: torch.Tensor,
        tgt_prefix: torch.Tensor,
        max_new_tokens: int,
        *,
        src_key_padding_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_token: int | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``tgt_prefix`` (B, P) (at least a start token) given ``src`` (B, Ns), as
        `LongNetLM.generate`: temperature 0 is greedy, ``top_k`` keeps the k likeliest. ``src`` is encoded once and
        its memory projected to each layer's cross-attention keys and values once (`init_caches`); the decoder's
        self-attention runs on a KV cache (`step`). With ``eos_token``, a row that has produced it produces only it
        after, and generation stops once every row has. Returns (B, P + n), n = max_new_tokens unless stopped early.
        The prefix must be unpadded (equal lengths): decoding takes no target padding mask."""
        _check_pair(src, tgt_prefix, "tgt_prefix")
        if tgt_prefix.shape[1] == 0:
            raise ValueError("tgt_prefix must hold at least one token (a start token), got length 0")
        _check_generate_args(max_new_tokens, temperature, top_k, self.head.out_features, eos_token)
        caches = self.init_caches(src, src_key_padding_mask)
        return _decode(self.step, caches, tgt_prefix, max_new_tokens, temperature, top_k, generator, eos_token)

    def init_caches(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> list[dict]:
        """The decoding state of ``src`` (B, Ns) for `step`, one dict per decoder layer: the memory's keys and
        values for its cross-attention (``src`` encoded once, projected once per layer), the source padding mask,
        and the (empty) KV cache of its self-attention."""
        _check_tokens("src", src)
        _check_padding_mask("src_key_padding_mask", src_key_padding_mask, src)
        memory = self.encoder(src, src_key_padding_mask)
        return [
            {"self": {}, "memory_kv": block.cross.project_memory(memory), "memory_padding_mask": src_key_padding_mask}
            for block in self.blocks
        ]

    def step(self, tokens: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Logits of target ``tokens`` (B, n) following the cached ones, with ``caches`` from `init_caches` (the
        whole prefix first, then one token at a time), as `LongNetLM.step`."""
        x = self.embed(tokens)
        for block, cache in zip(self.blocks, caches):
            x = block(
                x, cache=cache["self"], memory_kv=cache["memory_kv"], memory_padding_mask=cache["memory_padding_mask"]
            )
        return self.head(self.norm(x))
