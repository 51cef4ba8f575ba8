"""LongNetEncoder, LongNet (encoder–decoder) and MultiheadCrossAttention: equal to a hand-assembled dense reference,
padding never reaches real tokens, the decoder is causal, MAGNETO gains, gradients, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexdilated import LongNet, LongNetEncoder, MultiheadCrossAttention


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Move every parameter off its init (LayerNorms included), so that a misplaced weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def dense_mha(attn, E: int, H: int) -> nn.MultiheadAttention:
    """nn.MultiheadAttention with ``attn``'s q, k, v projections and an identity output projection (the sub-LN and
    the output projection are applied by hand after it)."""
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        mha.out_proj.weight.copy_(torch.eye(E, dtype=torch.float64))
        mha.out_proj.bias.zero_()
    return mha.eval()


def layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def reference_encoder(enc: LongNetEncoder, tokens, pad):
    """``LN(blocks(embed(tokens)))`` written out: x += W_o LN(MHA(LN(x))); x += W_2 LN(gelu(W_1 LN(x)))."""
    E, H = enc.embed.embedding_dim, enc.blocks[0].attn.num_heads
    x = enc.embed.weight[tokens]
    for blk in enc.blocks:
        a, ff = blk.attn, blk.ff
        h = layer_norm(x, blk.attn_norm)
        o, _ = dense_mha(a, E, H)(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + F.linear(layer_norm(o, a.norm), a.out_proj.weight, a.out_proj.bias)
        h = F.gelu(F.linear(layer_norm(x, blk.ff_norm), ff.fc1.weight, ff.fc1.bias))
        x = x + F.linear(layer_norm(h, ff.norm), ff.fc2.weight, ff.fc2.bias)
    return layer_norm(x, enc.norm)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("segments, rates", [((24,), (1,)), ((32, 64), (1, 1))])
def test_encoder_equals_dense_reference_where_the_pattern_is_dense(segments, rates, padded):
    # w >= N and r = 1: every pattern covers all pairs; two such patterns (multiset) weigh every key twice, which the
    # softmax cancels: the encoder is then a dense bidirectional transformer
    torch.manual_seed(0)
    enc = perturb(LongNetEncoder(30, 16, 2, 4, segments, rates, position=None).double(), 1).eval()
    tokens = torch.randint(0, 30, (3, 24))
    pad = torch.zeros(3, 24, dtype=torch.bool)
    if padded:
        pad[0, 20:], pad[2, 3:9] = True, True
    out = enc(tokens, pad if padded else None)
    assert out.shape == (3, 24, 16)
    torch.testing.assert_close(out, reference_encoder(enc, tokens, pad if padded else None), rtol=1e-10, atol=1e-10)


def test_encoder_padding_never_reaches_real_tokens():
    torch.manual_seed(1)
    enc = perturb(LongNetEncoder(30, 16, 2, 4, (8, 16), (1, 2), num_kv_heads=2).double(), 2).eval()
    tokens = torch.randint(0, 30, (3, 40))
    pad = torch.zeros(3, 40, dtype=torch.bool)
    pad[0, 29:], pad[1, 5:12], pad[2] = True, True, True  # at the end, in the middle, everything
    out = enc(tokens, pad)
    other = torch.where(pad, torch.randint(0, 30, (3, 40)), tokens)
    assert (other != tokens).any()
    torch.testing.assert_close(enc(other, pad)[~pad], out[~pad], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()  # a sequence of padding only: no key anywhere, still no NaN
    assert not torch.allclose(enc(other)[~pad], out[~pad])  # without the mask the padding does matter


def small_longnet(**kwargs) -> LongNet:
    torch.manual_seed(0)
    return perturb(LongNet(30, 40, 16, 1, 2, 4, (8, 16), (1, 2), **kwargs).double(), 3).eval()


def test_decoder_is_causal():
    model = small_longnet()
    src, tgt = torch.randint(0, 30, (2, 33)), torch.randint(0, 40, (2, 24))
    logits = model(src, tgt)
    assert logits.shape == (2, 24, 40)
    for t in (0, 7, 16, 23):
        changed = tgt.clone()
        changed[:, t] = (tgt[:, t] + 1) % 40
        new = model(src, changed)
        torch.testing.assert_close(new[:, :t], logits[:, :t], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(new[:, t], logits[:, t])


def test_cross_attention_ignores_padded_source_tokens():
    model = small_longnet(num_kv_heads=2)
    src, tgt = torch.randint(0, 30, (3, 33)), torch.randint(0, 40, (3, 20))
    pad = torch.zeros(3, 33, dtype=torch.bool)
    pad[0, 25:], pad[1, :4], pad[2] = True, True, True  # the last source is padding only
    logits = model(src, tgt, pad)
    other = torch.where(pad, torch.randint(0, 30, (3, 33)), src)
    torch.testing.assert_close(model(other, tgt, pad), logits, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model(other, tgt)[:2], logits[:2])  # without the mask the padding does matter
    # a target whose source is all padding gets no cross-attention (0), neither NaN in the logits nor in gradients
    model.train()
    model.loss(src, tgt, pad).backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_cross_attention_equals_nn_multihead_attention():
    torch.manual_seed(4)
    ours = MultiheadCrossAttention(16, 4, sub_ln=False).double()
    ref = dense_mha(ours, 16, 4)
    with torch.no_grad():
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    query, memory = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 11, 16, dtype=torch.float64)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[0, 6:], pad[1, :2] = True, True
    expected, _ = ref(query, memory, memory, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(ours(query, memory, pad), expected, rtol=1e-12, atol=1e-12)
    pad[1] = True
    assert (ours(query, memory, pad)[1] == ours.out_proj.bias).all()  # no key: attention 0, then the projection


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_gradients_reach_every_parameter_and_checkpointing_gives_the_same(tie_embeddings):
    model = small_longnet(tie_embeddings=tie_embeddings).train()
    src, tgt = torch.randint(0, 30, (2, 40)), torch.randint(0, 40, (2, 25))
    pad = torch.arange(40).expand(2, -1) >= torch.tensor([[40], [31]])
    params = dict(model.named_parameters())
    assert ("head.weight" in params) != tie_embeddings
    grads = torch.autograd.grad(model.loss(src, tgt, pad), list(params.values()))
    for (name, _), g in zip(params.items(), grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    model.checkpointing = True
    assert model.encoder.checkpointing
    for g, h in zip(grads, torch.autograd.grad(model.loss(src, tgt, pad), list(params.values()))):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


def test_magneto_gains():
    torch.manual_seed(5)
    N, M, dim = 3, 2, 64
    model = LongNet(10, 10, dim, N, M, 4, (8,), (1,), ff_mult=4)
    enc_gain = math.sqrt(math.log(3 * M) * math.log(2 * N) / 3)
    for blk in model.encoder.blocks:
        assert blk.attn.gamma_init == enc_gain and blk.cross is None
    for blk in model.blocks:
        assert blk.attn.gamma_init == math.sqrt(math.log(3 * M)) and blk.cross.gamma_init == 1.0
    assert LongNetEncoder(10, dim, N, 4, (8,), (1,)).blocks[0].attn.gamma_init == math.sqrt(math.log(2 * N))
    xavier = math.sqrt(2 / (dim + 4 * dim))
    for blk, gain in ((model.encoder.blocks[0], enc_gain), (model.blocks[0], math.sqrt(math.log(3 * M)))):
        assert abs(blk.ff.fc1.weight.std().item() / (gain * xavier) - 1) < 0.05
        assert abs(blk.attn.v_proj.weight.std().item() / (gain * math.sqrt(1 / dim)) - 1) < 0.05
    assert abs(model.blocks[0].cross.v_proj.weight.std().item() / math.sqrt(1 / dim) - 1) < 0.05


def test_bad_construction():
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        LongNetEncoder(10, 30, 1, 4, (8,), (1,))
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        LongNet(10, 10, 30, 1, 1, 4, (8,), (1,))
    with pytest.raises(ValueError, match="causal attention only"):
        LongNetEncoder(10, 16, 1, 2, (8,), (1,), position="xpos")
    with pytest.raises(ValueError, match="position must be one of"):
        LongNet(10, 10, 16, 1, 1, 2, (8,), (1,), position="alibi")
    with pytest.raises(ValueError, match="src_vocab_size must be a positive int"):
        LongNet(0, 10, 16, 1, 1, 2, (8,), (1,))
    with pytest.raises(ValueError, match="decoder_depth must be a positive int"):
        LongNet(10, 10, 16, 1, 0, 2, (8,), (1,))
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        LongNetEncoder(10, 16, 1, 0, (8,), (1,))
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        MultiheadCrossAttention(30, 4)


def test_bad_forward_arguments():
    enc = LongNetEncoder(10, 16, 1, 2, (8,), (1,))
    model = LongNet(10, 10, 16, 1, 1, 2, (8,), (1,))
    tokens, pad = torch.randint(0, 10, (2, 8)), torch.zeros(2, 8, dtype=torch.bool)
    cases = [
        (lambda: enc(tokens.float()), "tokens must be an int tensor"),
        (lambda: enc(tokens[0]), "tokens must be an int tensor"),
        (lambda: enc(tokens, pad.int()), "key_padding_mask must be a bool tensor"),
        (lambda: enc(tokens, pad[:, :4]), "key_padding_mask must be a bool tensor"),
        (lambda: model(tokens.float(), tokens), "src must be an int tensor"),
        (lambda: model(tokens, tokens[None]), "tgt must be an int tensor"),
        (lambda: model(tokens, tokens[:1]), "src and tgt must have the same batch size"),
        (lambda: model(tokens, tokens, pad[:1]), "src_key_padding_mask must be a bool tensor"),
    ]
    cross = MultiheadCrossAttention(16, 2)
    x = torch.randn(2, 5, 16)
    cases += [
        (lambda: cross(x, x[..., :8]), r"memory must be \(B, N, 16\)"),
        (lambda: cross(x, x[:1]), "memory must have the query's batch size and dtype"),
        (lambda: cross(x, x.double()), "memory must have the query's batch size and dtype"),
        (lambda: cross(x, x, pad[:, :5].float()), "key_padding_mask must be a bool tensor"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
