"""Independent checks of the reference itself, of dilated_mask and its picture."""

import struct
import zlib

import pytest
import torch
import torch.nn.functional as F

from flexdilated import DilatedSpec, dilated_mask, reference_dilated_attention, save_mask_png
from flexdilated.merge import merge


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N, w", [(37, 37), (37, 64), (1, 5)])
def test_one_dense_pattern_is_sdpa(causal, N, w):
    q, k, v = (randn(2, 3, N, 8, seed=s) for s in range(3))
    out = reference_dilated_attention(q, k, v, DilatedSpec((w,), (1,), causal=causal))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=1e-12, atol=1e-12)


def test_gqa_reads_kv_head_h_over_group():
    q, k, v = randn(1, 6, 20, 4, seed=1), randn(1, 2, 20, 4, seed=2), randn(1, 2, 20, 4, seed=3)
    out = reference_dilated_attention(q, k, v, DilatedSpec((20,), (1,)))
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_multiset_is_the_lse_merge_of_single_patterns(causal):
    patterns = [(4, 1), (8, 2), (12, 3)]  # 12 is not a multiple of 8: no nesting assumed
    q, k, v = (randn(2, 6, 30, 5, seed=s) for s in range(3))
    singles = [
        reference_dilated_attention(q, k, v, DilatedSpec((w,), (r,), causal=causal), return_lse=True) for w, r in patterns
    ]
    # each single-pattern spec with H heads gives head h offset h % r, exactly as in the multi-pattern spec
    expected, expected_lse = merge([o for o, _ in singles], [l.double() for _, l in singles])
    spec = DilatedSpec(*zip(*patterns), causal=causal)
    out, lse = reference_dilated_attention(q, k, v, spec, return_lse=True)
    # the merge weights come from the float32 LSE the API returns: float32 accuracy, not float64
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, expected_lse.float())


def test_set_counts_a_shared_key_once():
    q, k, v = (randn(1, 1, 8, 4, seed=s) for s in range(3))
    twice = DilatedSpec((8, 8), (1, 1), overlap="multiset")  # every key reached twice: weights 2/2 -> same softmax
    once = DilatedSpec((8, 8), (1, 1), overlap="set")
    single = reference_dilated_attention(q, k, v, DilatedSpec((8,), (1,)), return_lse=True)
    torch.testing.assert_close(reference_dilated_attention(q, k, v, twice), single[0])
    _, lse_twice = reference_dilated_attention(q, k, v, twice, return_lse=True)
    _, lse_once = reference_dilated_attention(q, k, v, once, return_lse=True)
    torch.testing.assert_close(lse_twice - lse_once, torch.full_like(lse_once, torch.log(torch.tensor(2.0)).item()))
    torch.testing.assert_close(lse_once, single[1])


def test_dilated_mask_by_hand():
    # w=4, r=2, two heads: head 0 offset 0 sees positions {0, 2} and {4, 6}; head 1 offset 1 sees {1, 3}, {5, 7}
    m = dilated_mask(DilatedSpec((4, 8), (2, 1)), num_heads=2, seq_len=8)
    dense = torch.ones(8, 8, dtype=torch.int64)
    sparse0 = torch.zeros(8, 8, dtype=torch.int64)
    for block in ((0, 2), (4, 6)):
        for p in block:
            for t in block:
                sparse0[p, t] = 1
    sparse1 = torch.zeros(8, 8, dtype=torch.int64)
    for block in ((1, 3), (5, 7)):
        for p in block:
            for t in block:
                sparse1[p, t] = 1
    assert torch.equal(m[0], dense + sparse0)
    assert torch.equal(m[1], dense + sparse1)
    grouped = dilated_mask(DilatedSpec((4, 8), (2, 1), heads="grouped", causal=True), 3, 8)
    assert torch.equal(grouped[0], sparse0.tril()) and torch.equal(grouped[1], sparse0.tril())  # group 0: heads 0, 1
    assert torch.equal(grouped[2], dense.tril())


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    rows = [raw[y * (1 + 3 * width) + 1 : (y + 1) * (1 + 3 * width)] for y in range(height)]
    return width, height, lambda x, y: tuple(rows[y][3 * x : 3 * x + 3])


def test_mask_picture(tmp_path):
    m = dilated_mask(DilatedSpec((4, 8), (2, 1)), num_heads=2, seq_len=8)
    path = save_mask_png(m, tmp_path / "mask.png", scale=2)
    width, height, pixel = read_png(path)
    assert (width, height) == (2 * (8 + 2 + 8), 2 * 8)
    white, one, two, gap = (255, 255, 255), (158, 202, 225), (49, 130, 189), (200, 200, 200)
    assert pixel(0, 0) == two  # head 0, p=0, t=0: both patterns
    assert pixel(2, 0) == one  # head 0, p=0, t=1: dense pattern only
    assert pixel(16, 0) == gap
    assert pixel(2 * 10, 0) == one and pixel(2 * 11, 2) == two  # head 1: p=1, t=1 in both
    assert white not in {pixel(x, y) for x in range(16) for y in range(16)}
    causal = dilated_mask(DilatedSpec((4,), (1,), causal=True), 1, 4)
    _, _, pixel = read_png(save_mask_png(causal, tmp_path / "causal.png"))
    assert pixel(1, 0) == white and pixel(0, 1) == one
