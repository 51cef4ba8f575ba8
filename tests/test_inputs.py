"""Bad input gets a clear error naming the argument; the spec is validated when built."""

import math

import pytest
import torch

from flexdilated import DilatedSpec, dilated_attention, dilated_mask
from flexdilated.spec import branches, head_offsets

SPEC = DilatedSpec((8, 16), (1, 2))


def qkv(q=(1, 4, 16, 8), kv=(1, 2, 16, 8), dtype=torch.float32):
    return torch.randn(q, dtype=dtype), torch.randn(kv, dtype=dtype), torch.randn(kv, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(segment_lengths=(), dilation_rates=()), "at least one pattern"),
        (dict(segment_lengths=(8, 16), dilation_rates=(1,)), "equal lengths"),
        (dict(segment_lengths=(8, 0), dilation_rates=(1, 2)), "segment_lengths must hold positive ints"),
        (dict(segment_lengths=(8, 2.0), dilation_rates=(1, 2)), "segment_lengths"),
        (dict(segment_lengths=(8,), dilation_rates=(-1,)), "dilation_rates"),
        (dict(segment_lengths=(8,), dilation_rates=(True,)), "dilation_rates"),
        (dict(segment_lengths=8, dilation_rates=(1,)), "segment_lengths must be a sequence"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), heads="some"), "heads must be one of"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), overlap="union"), "overlap must be one of"),
        (dict(segment_lengths=(8,), dilation_rates=(1,), causal="yes"), "causal must be a bool"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DilatedSpec(**kwargs)


def test_spec_is_immutable_hashable_and_allows_w_not_multiple_of_r():
    spec = DilatedSpec([5, 10], [2, 3])
    assert spec.segment_lengths == (5, 10) and spec == DilatedSpec((5, 10), (2, 3))
    assert hash(spec) == hash(DilatedSpec((5, 10), (2, 3)))
    with pytest.raises(AttributeError):
        spec.causal = True


def test_grouped_heads_split_first_groups_larger():
    spec = DilatedSpec((4, 8, 16), (1, 2, 4), heads="grouped")
    offsets = head_offsets(spec, 8)  # groups of 3, 3, 2 heads: offsets g % r_g = 0, 1, 2
    assert offsets[0] == [0, 0, 0, None, None, None, None, None]
    assert offsets[1] == [None, None, None, 1, 1, 1, None, None]
    assert offsets[2] == [None] * 6 + [2, 2]
    assert [b.heads for b in branches(spec, 8)] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert head_offsets(DilatedSpec((4, 8), (1, 3)), 4)[1] == [0, 1, 2, 0]


@pytest.mark.parametrize(
    "args, error, match",
    [
        (qkv(q=(4, 16, 8)), ValueError, "q must be 4-D"),
        ((torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8, 1), torch.randn(1, 2, 16, 8)), ValueError, "k must be 4-D"),
        ((*qkv()[:2], torch.randn(1, 2, 15, 8)), ValueError, "k and v must have the same shape"),
        (qkv(kv=(2, 2, 16, 8)), ValueError, "k must match q in batch"),
        (qkv(kv=(1, 2, 15, 8)), ValueError, "k must match q"),
        (qkv(kv=(1, 2, 16, 4)), ValueError, "k must match q"),
        (qkv(kv=(1, 3, 16, 8)), ValueError, r"q's heads \(4\) must be a multiple of k's heads \(3\)"),
        (qkv(q=(1, 4, 0, 8), kv=(1, 2, 0, 8)), ValueError, "N >= 1"),
        ((torch.randn(1, 4, 16, 8), *qkv(dtype=torch.float64)[1:]), TypeError, r"k.dtype must equal q.dtype"),
        (tuple(x.int() for x in qkv()), TypeError, "q must be float16"),
        (([[1.0]], *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors(args, error, match):
    with pytest.raises(error, match=match):
        dilated_attention(*args, SPEC)


def test_device_mismatch_is_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v.device must equal q.device"):
        dilated_attention(q, k, v.to("meta"), SPEC)


@pytest.mark.parametrize("scale", [0, -1.0, math.inf, math.nan, True, "0.1"])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        dilated_attention(*qkv(), SPEC, scale=scale)


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (torch.zeros(1, 16), TypeError, "key_padding_mask must be a bool tensor"),
        (torch.zeros(1, 15, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(B, N\) = \(1, 16\)"),
        (torch.zeros(1, 16, dtype=torch.bool, device="meta"), ValueError, "key_padding_mask.device"),
    ],
)
def test_bad_key_padding_mask(mask, error, match):
    with pytest.raises(error, match=match):
        dilated_attention(*qkv(), SPEC, key_padding_mask=mask)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="spec must be a flexdilated.DilatedSpec"):
        dilated_attention(*qkv(), ((8,), (1,)))


@pytest.mark.parametrize("heads, seq_len, match", [(0, 8, "num_heads"), (2, 0, "seq_len"), (2, 8.0, "seq_len")])
def test_bad_mask_arguments(heads, seq_len, match):
    with pytest.raises(ValueError, match=match):
        dilated_mask(SPEC, heads, seq_len)


def test_spec_takes_integer_like_scalars():
    np = pytest.importorskip("numpy")
    spec = DilatedSpec((np.int64(8), torch.tensor(16)), [np.int32(1), torch.tensor(2, dtype=torch.int16)])
    assert spec == DilatedSpec((8, 16), (1, 2))
    assert all(type(x) is int for x in spec.segment_lengths + spec.dilation_rates)
    for bad in (np.bool_(True), torch.tensor(True), torch.tensor(2.0), np.float64(8.0), torch.tensor([8])):
        with pytest.raises(ValueError, match="segment_lengths must hold positive ints up to 2\\*\\*63 - 1"):
            DilatedSpec((bad,), (1,))


@pytest.mark.parametrize("w", [2**31, 2**40, 2**63 - 1])
@pytest.mark.parametrize("causal", [False, True])
def test_segments_far_longer_than_the_sequence(w, causal):
    """A "whole sequence" segment of any size up to the int64 range works (no int32 overflow inside)."""
    from flexdilated import reference_dilated_attention

    spec = DilatedSpec((w, 16), (3, 2), causal=causal)
    q, k, v = (torch.randn(2, 6, 50, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = dilated_attention(q, k, v, spec, return_lse=True)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, r)


def test_segment_beyond_int64_is_refused():
    with pytest.raises(ValueError, match=r"segment_lengths must hold positive ints up to 2\*\*63 - 1"):
        DilatedSpec((2**63,), (1,))
