"""The strided route (`flexdilated/strided.py`, CUDA's fast path) on CPU: its views, block tables, placement and
merge run eagerly here (eager flex, forward only) and must equal the float64 reference. The compiled kernels and
gradients are checked on a GPU (`test_gpu.py`)."""

import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from flexdilated import DilatedSpec, reference_dilated_attention
from flexdilated.strided import _strided_attention, _tables, head_classes, strided_classes

warnings.filterwarnings("ignore", "flex_attention called without torch.compile")


@st.composite
def strided_problems(draw):
    """Specs the strided route takes: w = L * r with L a multiple of 128, every w dividing the largest."""
    top = draw(st.sampled_from([1, 2, 4, 6]))
    rates = draw(st.lists(st.sampled_from([r for r in (1, 2, 3, 4, 6) if top % r == 0]), min_size=1, max_size=3))
    rates = sorted(set(rates) | {top})
    segments = [128 * r * draw(st.sampled_from([1, 1, 2])) for r in rates]
    assume(all(max(segments) % w == 0 for w in segments))
    spec = DilatedSpec(
        segments, rates, causal=draw(st.booleans()), heads=draw(st.sampled_from(["all", "grouped"])),
        overlap=draw(st.sampled_from(["multiset", "set"])),
    )
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    chunks, B = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return spec, B, heads, kv_heads, chunks * max(segments), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def run_strided(q, k, v, spec, split_heads=False, slab_out=False, scale=0.5):
    classes = strided_classes(q, k, spec)
    assert classes is not None
    W = max(spec.segment_lengths)
    chunks = [x.unflatten(2, (x.shape[2] // W, W)) for x in (q, k, v)]
    out = torch.full_like(q, float("nan")) if slab_out else None
    result = _strided_attention(*chunks, classes, *_tables(classes, spec.causal, q.device), spec.causal, scale,
                                split_heads, out=out)
    assert not slab_out or result[0] is out
    return result[:2]


@given(strided_problems())
def test_strided_route_matches_reference(problem):
    spec, B, H, Hkv, N, split, seed = problem
    assume(strided_classes(torch.empty(B, H, N, 16), torch.empty(B, Hkv, N, 16), spec) is not None)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, N, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    out, lse = run_strided(q, k, v, spec, split_heads=split, slab_out=seed % 2 == 1)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    reached = lse > float("-inf")
    torch.testing.assert_close(lse[reached].float(), ref_lse[reached], rtol=1e-6, atol=1e-6)


def test_rows_no_pattern_reaches_are_zero():
    spec = DilatedSpec((256, 512), (2, 4))  # heads 0 and 2 see only even tokens, so odd rows of them are empty
    q, k, v = (torch.randn(1, 4, 1024, 16, dtype=torch.float64) for _ in range(3))
    out, lse = run_strided(q, k, v, spec)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    empty = ref_lse == float("-inf")
    assert empty.any() and torch.equal(lse == float("-inf"), empty) and (out[empty] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_classes_are_strided_views_or_none():
    spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4))
    classes = head_classes(spec, 8, 2)
    # pattern r = 4: classes c = 0..3 with heads c, c + 4; with 2 kv heads each class reads kv heads 0 and 1
    r4 = [(c.offset, c.q_heads, c.kv_heads) for c in classes if c.branch.rate == 4]
    assert r4 == [(0, (0, 5, 4), (0, 2, 1)), (1, (1, 6, 4), (0, 2, 1)), (2, (2, 7, 4), (0, 2, 1)), (3, (3, 8, 4), (0, 2, 1))]
    assert head_classes(spec, 6, 2) is None  # r = 2, group 3: heads 0, 2, 4 read kv heads 0, 0, 1 (not a view)


@pytest.mark.parametrize(
    "spec, N",
    [
        (DilatedSpec((2048, 4096), (1, 2)), 6144),  # N not a multiple of the largest segment
        (DilatedSpec((2048, 6144), (1, 3)), 6144),  # 2048 divides 6144: taken
        (DilatedSpec((2048, 3072), (1, 2)), 6144),  # 2048 does not divide 3072
        (DilatedSpec((2048, 4096), (1, 3)), 8192),  # w % r != 0
        (DilatedSpec((2048, 4096), (1, 4)), 8192),  # w / r = 1024: fine; (512, 4) would give 128
        (DilatedSpec((512, 4096), (8, 4)), 8192),  # w / r = 64: not a multiple of the block
    ],
)
def test_which_specs_take_the_strided_route(spec, N):
    taken = strided_classes(torch.empty(1, 8, N, 16), torch.empty(1, 8, N, 16), spec) is not None
    W = max(spec.segment_lengths)
    expected = N % W == 0 and all(W % w == 0 and w % r == 0 and (w // r) % 128 == 0 for w, r in spec.patterns)
    assert taken == expected


def test_traced_inside_a_user_compile():
    """Under a user's torch.compile(fullgraph=True) the route is traced in place (CUDA runs it this way)."""
    from flexdilated.strided import strided_attention

    spec = DilatedSpec((128, 256, 512), (1, 2, 4), causal=True)
    q, k, v = (torch.randn(2, 8, 1024, 16, dtype=torch.float64) for _ in range(3))

    def f(q, k, v):
        return strided_attention(q * 2, k, v, spec, strided_classes(q, k, spec), 0.5)[0]

    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(out, reference_dilated_attention(q * 2, k, v, spec, scale=0.5), rtol=1e-10, atol=1e-10)
