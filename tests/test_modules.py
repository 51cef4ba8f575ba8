"""DilatedAttention and MultiheadDilatedAttention: equal to nn.MultiheadAttention where the pattern is dense,
GQA, init, gradients, dropout, compile, bad input."""

import math

import pytest
import torch
from torch import nn

from flexdilated import DilatedAttention, DilatedSpec, MultiheadDilatedAttention, dilated_attention
from flexdilated.reference import reference_dilated_attention


def mha_pair(E=16, H=4, N=24):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, bias=True, batch_first=True)
    nn.init.normal_(ref.in_proj_bias)
    ours = MultiheadDilatedAttention(E, H, (N,), (1,), sub_ln=False)
    with torch.no_grad():
        for proj, w, b in zip(
            (ours.q_proj, ours.k_proj, ours.v_proj), ref.in_proj_weight.chunk(3), ref.in_proj_bias.chunk(3)
        ):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ref, ours


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_one_dense_pattern_equals_nn_multihead_attention(causal, padded):
    N = 24
    ref, ours = mha_pair(N=N)
    x = torch.randn(3, N, 16)
    pad = torch.zeros(3, N, dtype=torch.bool)
    if padded:
        pad[0, 20:], pad[2, 9:] = True, True  # padding at the end: every query keeps a key
    mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None
    expected, _ = ref(x, x, x, key_padding_mask=pad if padded else None, attn_mask=mask, need_weights=False)
    out, weights = ours(x, x, x, key_padding_mask=pad if padded else None, is_causal=causal)
    assert weights is None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_batch_first_false_transposes():
    ref, ours = mha_pair()
    ours.batch_first = False
    x = torch.randn(24, 2, 16)
    (out, _), (expected, _) = ours(x, x, x), ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_gqa_and_sub_ln_follow_the_definition():
    torch.manual_seed(1)
    m = MultiheadDilatedAttention(24, 6, (8, 16), (1, 2), num_kv_heads=2, overlap="set")
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    m = m.double()
    q = m.q_proj(x).unflatten(-1, (6, 4)).transpose(1, 2)
    k = m.k_proj(x).unflatten(-1, (2, 4)).transpose(1, 2)
    v = m.v_proj(x).unflatten(-1, (2, 4)).transpose(1, 2)
    attn = reference_dilated_attention(q, k, v, DilatedSpec((8, 16), (1, 2), overlap="set"))
    expected = m.out_proj(m.norm(attn.transpose(1, 2).flatten(2)))
    torch.testing.assert_close(m(x, x, x)[0], expected, rtol=1e-10, atol=1e-10)


def test_init_statistics_and_gradients_reach_every_parameter():
    torch.manual_seed(2)
    m = MultiheadDilatedAttention(256, 8, (64, 128), (1, 2), gamma_init=2.0)
    xavier = math.sqrt(2.0 / (256 + 256))
    assert abs(m.q_proj.weight.std().item() / xavier - 1) < 0.05
    assert abs(m.v_proj.weight.std().item() / (2.0 * xavier) - 1) < 0.05
    assert abs(m.out_proj.weight.std().item() / (2.0 * xavier) - 1) < 0.05
    assert (m.q_proj.bias == 0).all()
    m(*(torch.randn(2, 300, 256),) * 3, is_causal=True)[0].square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_applies_in_training_only():
    torch.manual_seed(3)
    m = MultiheadDilatedAttention(16, 4, (8,), (1,), dropout=0.5, sub_ln=False)
    x = torch.randn(2, 16, 16)
    m.eval()
    assert torch.equal(m(x, x, x)[0], m(x, x, x)[0])
    m.train()
    a, b = m(x, x, x)[0], m(x, x, x)[0]
    assert not torch.allclose(a, b)


def test_dilated_attention_module_is_the_function():
    layer = DilatedAttention((8, 16), (1, 2), causal=True, scale=0.5)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    torch.testing.assert_close(layer(q, k, v), dilated_attention(q, k, v, layer.spec, scale=0.5))


def test_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    m = MultiheadDilatedAttention(32, 4, (16, 32), (1, 2))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 64, 32, requires_grad=True)
    out = compiled(x, x, x, is_causal=True)[0]
    out.sum().backward()
    torch.testing.assert_close(out, m(x, x, x, is_causal=True)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=30, num_heads=4), r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
        (dict(embed_dim=32, num_heads=4, num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        (dict(embed_dim=0, num_heads=4), "embed_dim must be a positive int"),
        (dict(embed_dim=32, num_heads=4, dropout=1.0), "dropout must be in"),
        (dict(embed_dim=32, num_heads=4, gamma_init=0), "gamma_init must be"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiheadDilatedAttention(segment_lengths=(8,), dilation_rates=(1,), **kwargs)


def test_bad_forward_arguments():
    m = MultiheadDilatedAttention(16, 4, (8,), (1,))
    x = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        m(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        m(x, x, x, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query must be \(B, N, 16\)"):
        m(x[..., :8], x, x)
    with pytest.raises(ValueError, match="key and value must have the query's batch and length"):
        m(x, x[:, :4], x[:, :4])
