"""Independent checks of the reference itself, of dilated_mask and its picture."""

import re
import sys

import pytest
import torch
import torch.nn.functional as F

from flexdilated import DilatedSpec, dilated_mask, plot_mask, reference_dilated_attention
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


def test_plot_mask_panels(tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image")
    m = dilated_mask(DilatedSpec((4, 8, 16), (1, 2, 4)), num_heads=3, seq_len=16)
    assert m.max() == 3
    m[1, 0, 0] = 5  # more patterns than levels: drawn as 3+
    path = tmp_path / "mask.png"
    fig = plot_mask(m, path, title="three heads")
    assert fig._suptitle.get_text() == "three heads"
    assert len(fig.axes) == 3
    for h, ax in enumerate(fig.axes):
        assert ax.get_title() == f"head {h}"
        assert ax.get_xlabel() == "key position t"
        assert len(ax.images) == 1
        assert torch.equal(torch.as_tensor(ax.images[0].get_array()).long(), m[h].clamp(max=3))
    assert fig.axes[0].get_ylabel() == "query position p"
    # one colour per multiplicity level, in the legend and in the image
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["0: not attended", "1 pattern", "2 patterns", "3+ patterns"]
    image = fig.axes[0].images[0]
    colours = [tuple(image.cmap(image.norm(level))) for level in range(4)]
    assert len(set(colours)) == 4 and colours[0] == (1.0, 1.0, 1.0, 1.0)
    assert colours == [tuple(patch.get_facecolor()) for patch in legend.get_patches()]
    # the PNG reads back at the figure's size
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpl_image.imread(path)
    width, height = fig.get_size_inches() * 150
    assert pixels.shape[:2] == (round(height), round(width)) and pixels.shape[2] in (3, 4)


def test_plot_mask_heads_and_rows():
    pytest.importorskip("matplotlib")
    m = dilated_mask(DilatedSpec((4,), (1,), causal=True), 6, 4)
    fig = plot_mask(m, heads=[5, 2])
    assert [ax.get_title() for ax in fig.axes] == ["head 5", "head 2"]
    data = torch.as_tensor(fig.axes[0].images[0].get_array())
    assert data[0, 1] == 0 and data[1, 0] == 1  # causal: p = 0 does not attend t = 1
    six = plot_mask(m)
    assert len(six.axes) == 6  # four a row: two rows
    assert [ax.get_subplotspec().rowspan.start for ax in six.axes] == [0, 0, 0, 0, 1, 1]
    assert sum(ax.get_ylabel() == "query position p" for ax in six.axes) == 2


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 4, dtype=torch.long), "(H, N, N)"),
    (torch.zeros(2, 4, 5, dtype=torch.long), "(H, N, N)"),
    (torch.zeros(0, 4, 4, dtype=torch.long), "(H, N, N)"),
    ([[[1]]], "(H, N, N)"),
    (-torch.ones(1, 2, 2, dtype=torch.long), "non-negative"),
    (torch.full((1, 2, 2), 0.5), "whole numbers"),
])
def test_plot_mask_rejects_bad_masks(bad, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        plot_mask(bad)


@pytest.mark.parametrize("heads", [[], [2], [-1], [True], [0.0]])
def test_plot_mask_rejects_bad_heads(heads):
    with pytest.raises(ValueError, match="heads"):
        plot_mask(torch.ones(2, 3, 3, dtype=torch.long), heads=heads)


def test_plot_mask_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install flexdilated[plot]")):
        plot_mask(torch.ones(1, 2, 2, dtype=torch.long))
