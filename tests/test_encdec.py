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


def recording_steps(model: LongNet) -> list:
    """Record the logits of every `step` that `generate` makes (an instance attribute shadows the method)."""
    logits, step = [], model.step

    def record(tokens, caches):
        out = step(tokens, caches)
        logits.append(out)
        return out

    model.step = record
    return logits


GREEDY, TOP_K = dict(temperature=0), dict(temperature=1.0, top_k=5)


@pytest.mark.parametrize(
    "segments, rates, padded, sampling",
    [
        ((8, 16), (1, 2), False, GREEDY),
        ((8, 16), (1, 2), True, TOP_K),
        ((4, 6, 12), (1, 2, 3), True, GREEDY),
        ((4, 6, 12), (1, 2, 3), False, TOP_K),
    ],
)
def test_generate_logits_equal_full_forward(segments, rates, padded, sampling):
    # decoded length 5 + 20 = 25 exceeds every segment: steps cross segment boundaries of every branch
    torch.manual_seed(0)
    model = perturb(LongNet(30, 40, 16, 1, 2, 4, segments, rates, num_kv_heads=2).double(), 3).eval()
    src, prefix = torch.randint(0, 30, (3, 33)), torch.randint(0, 40, (3, 5))
    pad = None
    if padded:  # padding at the end, at the start (both leave some keys), everything
        pad = torch.zeros(3, 33, dtype=torch.bool)
        pad[0, 25:], pad[1, :4], pad[2] = True, True, True
    steps = recording_steps(model)
    g = torch.Generator().manual_seed(1)
    out = model.generate(src, prefix, 20, src_key_padding_mask=pad, generator=g, **sampling)
    assert out.shape == (3, 25) and torch.equal(out[:, :5], prefix)
    assert [s.shape[1] for s in steps] == [5] + [1] * 19  # the prefix whole, then one token at a time
    full = model(src, out, pad)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, :-1], rtol=1e-10, atol=1e-10)
    if sampling["temperature"] == 0:
        assert torch.equal(out[:, 5:], full[:, 4:-1].argmax(-1))
    else:  # top_k: every sampled token is among the 5 likeliest
        kth = full[:, 4:-1].topk(5, dim=-1).values[..., -1]
        assert (full[:, 4:-1].gather(-1, out[:, 5:, None])[..., 0] >= kth).all()


def test_generate_encodes_and_projects_the_memory_once():
    model = small_longnet()  # decoder_depth 2
    counts = {"encoder": 0, "k_proj": 0, "v_proj": 0}

    def counter(name):
        def hook(*_):
            counts[name] += 1

        return hook

    model.encoder.register_forward_hook(counter("encoder"))
    for block in model.blocks:
        block.cross.k_proj.register_forward_hook(counter("k_proj"))
        block.cross.v_proj.register_forward_hook(counter("v_proj"))
    out = model.generate(torch.randint(0, 30, (2, 20)), torch.randint(0, 40, (2, 3)), 8, temperature=0)
    assert out.shape == (2, 11)
    assert counts == {"encoder": 1, "k_proj": 2, "v_proj": 2}  # not 2 × 8 steps


def test_generate_stops_at_eos():
    model = small_longnet()
    src, prefix = torch.randint(0, 30, (3, 20)), torch.randint(0, 40, (3, 4))
    free = model.generate(src, prefix, 12, temperature=0)
    eos = int(free[0, 4])  # row 0 produces it first
    out = model.generate(src, prefix, 12, temperature=0, eos_token=eos)
    expected = free.clone()
    for row in expected:
        hits = (row[4:] == eos).nonzero()
        if len(hits):
            row[4 + hits[0, 0] :] = eos
    done = (expected[:, 4:] == eos).cummax(dim=1).values.all(dim=0)  # after each new token: has every row finished?
    length = 4 + (int(done.nonzero()[0, 0]) + 1 if done.any() else 12)
    assert torch.equal(out, expected[:, :length])
    assert (out[0, 4:] == eos).all()


@pytest.mark.parametrize("position", ["rope", None])
def test_left_padded_target_equals_the_unpadded_target_alone(position):
    # a pattern dense over the whole target: a left-padded row, with the mask, is the unpadded row shifted (positions
    # enter only as differences), so its logits at the real tokens are those of the real tokens alone
    torch.manual_seed(0)
    model = perturb(LongNet(30, 40, 16, 1, 2, 4, (32,), (1,), position=position).double(), 3).eval()
    src, tgt = torch.randint(0, 30, (3, 17)), torch.randint(0, 40, (3, 20))
    lefts = (0, 6, 13)
    pad = torch.arange(20)[None] < torch.tensor(lefts)[:, None]
    logits = model(src, tgt, None, pad)
    for b, left in enumerate(lefts):
        alone = model(src[b : b + 1], tgt[b : b + 1, left:])[0]
        torch.testing.assert_close(logits[b, left:], alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(model(src, tgt)[2, 13:], logits[2, 13:])  # without the mask the padding does matter


def test_target_padding_never_reaches_real_tokens():
    # dilated decoder self-attention, left padding (right padding sits after every real query of a causal decoder:
    # it never matters): the logits at real positions do not depend on the padded tokens with the mask, do without
    model = small_longnet(num_kv_heads=2)
    src, tgt = torch.randint(0, 30, (3, 33)), torch.randint(0, 40, (3, 30))
    spad = torch.zeros(3, 33, dtype=torch.bool)
    spad[1, 29:] = True
    pad = torch.zeros(3, 30, dtype=torch.bool)
    pad[0, :5], pad[1, :19], pad[2, 10:14] = True, True, True  # left (within a segment, past one), in the middle
    logits = model(src, tgt, spad, pad)
    other = torch.where(pad, (tgt + 1 + torch.randint(0, 38, tgt.shape)) % 40, tgt)
    assert (other != tgt)[pad].all()
    torch.testing.assert_close(model(src, other, spad, pad)[~pad], logits[~pad], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(logits).all()
    unmasked = model(src, other, spad)
    for b in range(3):
        assert not torch.allclose(unmasked[b][~pad[b]], logits[b][~pad[b]])


def test_loss_is_the_mean_over_real_targets():
    model = small_longnet()
    src, tgt = torch.randint(0, 30, (3, 21)), torch.randint(0, 40, (3, 18))
    pad = torch.zeros(3, 18, dtype=torch.bool)
    pad[0, 12:], pad[1, :7] = True, True  # right padding, left padding, none
    logits = model(src, tgt[:, :-1], None, pad[:, :-1]).float()  # loss takes the cross-entropy in float32
    terms = []
    for b in range(3):
        for t in range(17):
            if not pad[b, t] and not pad[b, t + 1]:  # a real target after a real input
                terms.append(-logits[b, t].log_softmax(-1)[tgt[b, t + 1]])
    assert len(terms) == 11 + 10 + 17
    expected = torch.stack(terms).mean()
    loss = model.loss(src, tgt, None, pad)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    other = torch.where(pad, (tgt + 7) % 40, tgt)
    torch.testing.assert_close(model.loss(src, other, None, pad), loss, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model.loss(src, tgt), loss)
    none = torch.zeros_like(pad)
    # an all-False mask: the same mean, summed in another order (float32)
    torch.testing.assert_close(model.loss(src, tgt, None, none), model.loss(src, tgt), rtol=1e-6, atol=1e-6)
    # training with left padding: finite gradients everywhere (padded queries reach no key: 0, never NaN)
    model.train()
    model.loss(src, tgt, None, pad).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.loss(src, tgt, None, torch.ones_like(pad)).item() == 0.0  # no real target: 0, not NaN


def test_bad_generate_and_target_padding_arguments():
    model = LongNet(10, 12, 16, 1, 1, 2, (8,), (1,))
    src, tgt = torch.randint(0, 10, (2, 8)), torch.randint(0, 12, (2, 6))
    spad, tpad = torch.zeros(2, 8, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)
    cases = [
        (lambda: model(src, tgt, None, tpad.int()), "tgt_key_padding_mask must be a bool tensor"),
        (lambda: model(src, tgt, spad, tpad[:, :4]), "tgt_key_padding_mask must be a bool tensor"),
        (lambda: model.loss(src, tgt, None, tpad[:1]), "tgt_key_padding_mask must be a bool tensor"),
        (lambda: model.loss(src, tgt.float()), "tgt must be an int tensor"),
        (lambda: model.generate(src, tgt.float(), 3), "tgt_prefix must be an int tensor"),
        (lambda: model.generate(src, tgt[:1], 3), "src and tgt_prefix must have the same batch size"),
        (lambda: model.generate(src.float(), tgt, 3), "src must be an int tensor"),
        (lambda: model.generate(src, tgt[:, :0], 3), "tgt_prefix must hold at least one token"),
        (lambda: model.generate(src, tgt, 3, src_key_padding_mask=tpad), "src_key_padding_mask must be a bool"),
        (lambda: model.generate(src, tgt, -1), "max_new_tokens must be an int >= 0"),
        (lambda: model.generate(src, tgt, 2.0), "max_new_tokens must be an int >= 0"),
        (lambda: model.generate(src, tgt, 3, temperature=-0.5), "temperature must be a number >= 0"),
        (lambda: model.generate(src, tgt, 3, top_k=0), r"top_k must be None or an int in \[1, 12\]"),
        (lambda: model.generate(src, tgt, 3, top_k=13), r"top_k must be None or an int in \[1, 12\]"),
        (lambda: model.generate(src, tgt, 3, eos_token=12), r"eos_token must be None or a token id in \[0, 12\)"),
    ]
    cross = model.blocks[0].cross
    kv = cross.project_memory(torch.randn(2, 5, 16))
    cases += [
        (lambda: cross.attend(torch.randn(3, 4, 16), kv), r"query must be \(B, N, 16\) with B = 2"),
        (lambda: cross.attend(torch.randn(2, 4, 16), kv, spad), "key_padding_mask must be a bool tensor"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    assert torch.equal(model.generate(src, tgt, 0), tgt)
