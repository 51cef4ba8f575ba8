"""MultiheadDilatedAttention as ``self_attn`` of PyTorch's own Transformer layers, stacks and nn.Transformer: train
and eval (never PyTorch's fused fast path), padding masks as PyTorch hands them over (float 0 / -inf), the causal
``attn_mask`` hint, nested tensors, unbatched input — each compared with the layer's formula on the reference."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flexdilated import DilatedSpec, MultiheadDilatedAttention, reference_dilated_attention

E, H, N, B = 32, 4, 24, 3
SEGMENTS, RATES = (4, 8, 16), (1, 2, 4)
F64 = dict(dtype=torch.float64)


def dilated(batch_first=True, **kw):
    return MultiheadDilatedAttention(E, H, SEGMENTS, RATES, batch_first=batch_first, **F64, **kw)


def reference_self_attn(mod: MultiheadDilatedAttention, x, padding=None, causal=False):
    """The module's math with the reference attention: x (B, N, E) -> (B, N, E)."""
    q, k, v = (
        proj(x).unflatten(-1, (-1, mod.head_dim)).transpose(1, 2) for proj in (mod.q_proj, mod.k_proj, mod.v_proj)
    )
    spec = DilatedSpec(SEGMENTS, RATES, causal=causal)
    out = reference_dilated_attention(q, k, v, spec, key_padding_mask=padding)
    return mod.out_proj(mod.norm(out.transpose(1, 2).flatten(2)))


def encoder_layer_formula(layer, x, padding=None, causal=False):
    sa = lambda y: reference_self_attn(layer.self_attn, y, padding, causal)  # noqa: E731
    ff = lambda y: layer.linear2(layer.activation(layer.linear1(y)))  # noqa: E731
    if layer.norm_first:
        x = x + sa(layer.norm1(x))
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + sa(x))
    return layer.norm2(x + ff(x))


def padding_mask():
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, -5:], pad[2, -11:] = True, True
    return pad


@pytest.fixture(autouse=True)
def no_fused_fast_path(monkeypatch):
    """PyTorch's fused encoder kernels would bypass the module: make them fail loudly if ever called."""

    def refuse(*args, **kwargs):
        raise AssertionError("PyTorch's fused Transformer fast path was taken")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", refuse)
    monkeypatch.setattr(torch, "_native_multi_head_attention", refuse)


def encoder_layer(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=norm_first, **F64)
    layer.self_attn = dilated()
    return layer


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_layer_equals_its_formula_on_the_reference(norm_first, training, padded):
    layer = encoder_layer(norm_first).train(training)
    x = torch.randn(B, N, E, **F64)
    pad = padding_mask() if padded else None
    with torch.no_grad():  # eval + no_grad is exactly when PyTorch would pick its fused path
        out = layer(x, src_key_padding_mask=pad)
    torch.testing.assert_close(out, encoder_layer_formula(layer, x, pad))


def test_encoder_layer_gradients_equal_the_reference():
    layer = encoder_layer(norm_first=True)
    x = torch.randn(B, N, E, **F64)
    pad = padding_mask()
    layer(x, src_key_padding_mask=pad).square().sum().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    encoder_layer_formula(layer, x, pad).square().sum().backward()
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_float_padding_mask_equals_bool():
    m = dilated()
    x = torch.randn(B, N, E, **F64)
    pad = padding_mask()
    as_float = torch.zeros(B, N, **F64).masked_fill(pad, float("-inf"))
    torch.testing.assert_close(m(x, x, x, key_padding_mask=as_float)[0], m(x, x, x, key_padding_mask=pad)[0])
    with pytest.raises(ValueError, match="only 0 .* and -inf"):
        m(x, x, x, key_padding_mask=as_float.masked_fill(~pad, 0.5))


def test_encoder_stack_inference_with_nested_tensors_equals_training_path():
    """nn.TransformerEncoder turns padded input into nested tensors in eval without grad (when its first layer
    looked fast-path-able at construction, as nn.Transformer's do): the module must handle them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stack = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, **F64), 2)
    for layer in stack.layers:
        layer.self_attn = dilated()
    assert stack.use_nested_tensor  # built with nn.MultiheadAttention: the nested path is armed
    stack.eval()
    x, pad = torch.randn(B, N, E, **F64), padding_mask()
    seen = []
    stack.layers[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_nested))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        nested = stack(x, src_key_padding_mask=pad)
    assert seen == [True]
    expected = x
    for layer in stack.layers:
        expected = encoder_layer_formula(layer, expected, pad)
    real = ~pad
    torch.testing.assert_close(nested[real], expected[real])
    assert (nested[pad] == 0).all()  # PyTorch's nested path pads its output with zeros


def decoder_layer():
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True, **F64)
    layer.self_attn = dilated()
    return layer


def decoder_layer_formula(layer, x, memory):
    x = layer.norm1(x + reference_self_attn(layer.self_attn, x, causal=True))
    x = layer.norm2(x + layer.multihead_attn(x, memory, memory, need_weights=False)[0])
    return layer.norm3(x + layer.linear2(F.relu(layer.linear1(x))))


@pytest.mark.parametrize(
    "how",
    ["documented", "hint only", "float mask only", "bool mask only"],
)
def test_decoder_layer_causal_self_attention(how):
    layer = decoder_layer()
    x, memory = torch.randn(B, N, E, **F64), torch.randn(B, 10, E, **F64)
    square = nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.float64)
    kwargs = {
        "documented": dict(tgt_mask=square, tgt_is_causal=True),  # how PyTorch's docs call it
        "hint only": dict(tgt_is_causal=True),
        "float mask only": dict(tgt_mask=square),
        "bool mask only": dict(tgt_mask=torch.ones(N, N, dtype=torch.bool).triu(1)),
    }[how]
    torch.testing.assert_close(layer(x, memory, **kwargs), decoder_layer_formula(layer, x, memory))


@pytest.mark.parametrize(
    "mask",
    [
        torch.zeros(N, N, dtype=torch.bool),  # dense, not causal
        torch.ones(N, N, dtype=torch.bool).triu(2),  # causal plus one key
        torch.zeros(N, N, dtype=torch.float64).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -1e9),
        torch.zeros(N, N, dtype=torch.float64),  # float, dense
    ],
)
def test_any_other_attn_mask_raises(mask):
    layer = decoder_layer()
    x, memory = torch.randn(B, N, E, **F64), torch.randn(B, 10, E, **F64)
    with pytest.raises(ValueError, match="exactly the causal mask"):
        layer(x, memory, tgt_mask=mask, tgt_is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask must be the causal mask of shape \(N, N\)"):
        layer.self_attn(x, x, x, attn_mask=torch.zeros(N + 1, N + 1, dtype=torch.bool))


def test_nn_transformer_trains_and_evaluates_with_dilated_self_attention():
    torch.manual_seed(2)
    model = nn.Transformer(E, H, 2, 2, 64, dropout=0.0, batch_first=True, **F64)
    for layer in (*model.encoder.layers, *model.decoder.layers):
        layer.self_attn = dilated()
    src, tgt, pad = torch.randn(B, N, E, **F64), torch.randn(B, 16, E, **F64), padding_mask()
    square = nn.Transformer.generate_square_subsequent_mask(16, dtype=torch.float64)
    kwargs = dict(tgt_mask=square, tgt_is_causal=True, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    out = model(src, tgt, **kwargs)
    out.square().sum().backward()
    for layer in (*model.encoder.layers, *model.decoder.layers):
        assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0

    memory = src
    for layer in model.encoder.layers:
        memory = encoder_layer_formula(layer, memory, pad)
    memory = model.encoder.norm(memory)
    x = tgt
    for layer in model.decoder.layers:
        x = layer.norm1(x + reference_self_attn(layer.self_attn, x, causal=True))
        x = layer.norm2(x + layer.multihead_attn(x, memory, memory, key_padding_mask=pad, need_weights=False)[0])
        x = layer.norm3(x + layer.linear2(F.relu(layer.linear1(x))))
    torch.testing.assert_close(out, model.decoder.norm(x))
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(src, tgt, **kwargs), out.detach())


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_input_equals_a_batch_of_one(batch_first):
    m = dilated(batch_first=batch_first)
    x = torch.randn(N, E, **F64)
    pad = torch.zeros(N, dtype=torch.bool)
    pad[-3:] = True
    out, weights = m(x, x, x, key_padding_mask=pad, is_causal=True)
    batched = x[None] if batch_first else x[:, None]
    expected = m(batched, batched, batched, key_padding_mask=pad[None], is_causal=True)[0]
    assert weights is None and out.shape == (N, E)
    torch.testing.assert_close(out, expected[0] if batch_first else expected[:, 0])
    torch.testing.assert_close(out, reference_self_attn(m, x[None], pad[None], causal=True)[0])


def test_fast_path_attributes_rule_it_out():
    m = MultiheadDilatedAttention(E, H, SEGMENTS, RATES, num_kv_heads=2, bias=False)
    assert m._qkv_same_embed_dim is False
    assert m.in_proj_weight.shape == (E + 2 * (E // 2), E) and (m.in_proj_bias == 0).all()
