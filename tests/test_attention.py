"""The fast path against the reference on random specs and inputs (CPU): outputs, LSE and gradients."""

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexdilated.attention as attention
from flexdilated import DilatedSpec, dilated_attention, reference_dilated_attention

@st.composite
def problems(draw, max_len=40):
    n = draw(st.integers(1, 5))
    segments = draw(st.lists(st.integers(1, 24), min_size=n, max_size=n))
    rates = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    spec = DilatedSpec(
        segments,
        rates,
        causal=draw(st.booleans()),
        heads=draw(st.sampled_from(["all", "grouped"])),
        overlap=draw(st.sampled_from(["multiset", "set"])),
    )
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    N = draw(st.integers(1, max_len))
    B, D = draw(st.integers(1, 2)), draw(st.sampled_from([1, 4, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    return spec, B, heads, kv_heads, N, D, seed


def make_inputs(B, H, Hkv, N, D, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def outputs_and_grads(fn, xs, spec, grad_out, grad_lse, scale=None, pad=None):
    out, lse = fn(*xs, spec, scale=scale, return_lse=True, key_padding_mask=pad)
    reached = lse > float("-inf")
    loss = (out * grad_out).sum() + (lse[reached] * grad_lse[reached]).sum()
    return out, lse, torch.autograd.grad(loss, xs)


def check_against_reference(spec, B, H, Hkv, N, D, seed, dtype=torch.float64, tol=1e-10, padding=False):
    xs = make_inputs(B, H, Hkv, N, D, seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(B, H, N, D, generator=gen, dtype=dtype)
    grad_lse = torch.randn(B, H, N, generator=gen)
    pad = torch.rand(B, N, generator=gen) < 0.3 if padding else None
    scale = 0.3 + (seed % 7) / 5
    out, lse, grads = outputs_and_grads(dilated_attention, xs, spec, grad_out, grad_lse, scale, pad)
    ref_out, ref_lse, ref_grads = outputs_and_grads(reference_dilated_attention, xs, spec, grad_out, grad_lse, scale, pad)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == (B, H, N, D) and lse.shape == (B, H, N)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    assert torch.isfinite(out).all() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=tol, atol=tol)


@given(problems())
def test_matches_reference_float64(problem):
    check_against_reference(*problem)


@given(problems(max_len=30))
def test_matches_reference_float32(problem):
    check_against_reference(*problem, dtype=torch.float32, tol=2e-5)


@given(problems(max_len=40))
def test_key_padding_mask_matches_reference(problem):
    """Keys marked as padding leave every pattern; rows left with no key give 0 and LSE -inf."""
    check_against_reference(*problem, padding=True)


@given(problems(max_len=30))
def test_padded_tails_match_reference(problem):
    """The GPU route gathers tails into whole-segment shapes; the same layout through the CPU route."""
    with mock.patch.object(attention, "_pad_tails", lambda q: True):
        check_against_reference(*problem)


@given(problems(max_len=60))
def test_slabs_match_reference(problem):
    """Long sequences run in independent slabs of whole chunks; tiny slabs here, so most cases have several."""
    with mock.patch.object(attention, "SLAB_ELEMENTS", 1):
        check_against_reference(*problem)


def test_slab_length():
    assert attention.slab_length(DilatedSpec((4, 8), (1, 2)), 2**20, 100) == 64  # 2**26 elements of q
    assert attention.slab_length(DilatedSpec((4, 8), (1, 2)), 2**27, 100) == 8  # at least one chunk
    assert attention.slab_length(DilatedSpec((4, 6), (1, 2)), 1, 100) == 100  # 4 does not divide 6: one slab


@pytest.mark.parametrize(
    "spec, N",
    [
        (DilatedSpec((64, 128, 256), (1, 2, 4)), 1000),  # N not a multiple of any segment, several whole segments
        (DilatedSpec((64, 128, 256), (1, 2, 4), causal=True, overlap="set"), 700),
        (DilatedSpec((2048, 4096), (1, 2), causal=True), 300),  # every segment longer than N
        (DilatedSpec((96, 160), (3, 5), heads="grouped"), 481),  # w % r != 0 is fine, and w % r == 0 too
    ],
)
def test_longer_sequences(spec, N):
    check_against_reference(spec, 1, 4, 2, N, 16, seed=N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    spec = DilatedSpec((16, 32), (1, 2), causal=True)
    q, k, v = (x.detach().to(dtype) for x in make_inputs(2, 4, 2, 77, 16, 0))
    out = dilated_attention(q, k, v, spec)
    ref = reference_dilated_attention(q.double(), k.double(), v.double(), spec)
    assert out.dtype == dtype
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_rows_no_pattern_reaches_are_zero_with_lse_minus_inf():
    spec = DilatedSpec((8, 16), (2, 4))  # head 0 uses offset 0 in both: odd positions reach nothing
    q, k, v = make_inputs(1, 4, 4, 40, 8, 3)
    out, lse = dilated_attention(q, k, v, spec, return_lse=True)
    assert (out[0, 0, 1::2] == 0).all() and (lse[0, 0, 1::2] == float("-inf")).all()
    assert (lse[0, 0, 0::2] > float("-inf")).all()
    (out.sum() + lse[lse > float("-inf")].sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_nan_propagates_to_rows_that_attend_it():
    spec = DilatedSpec((8,), (1,))
    q, k, v = (x.detach() for x in make_inputs(1, 2, 2, 24, 4, 5))
    k[0, 0, 3] = float("nan")  # segment 0 of head 0
    q[0, 1, 20] = float("inf")
    out = dilated_attention(q, k, v, spec)
    ref = reference_dilated_attention(q, k, v, spec)
    assert out[0, 0, :8].isnan().all() and torch.isfinite(out[0, 0, 8:]).all()
    assert out[0, 1, 20].isnan().all() and torch.isfinite(out[0, 1, :16]).all()
    assert torch.equal(out.isnan(), ref.isnan())


def test_default_scale_is_inverse_sqrt_head_dim():
    spec = DilatedSpec((8, 16), (1, 2))
    q, k, v = (x.detach() for x in make_inputs(1, 2, 2, 32, 9, 1))
    torch.testing.assert_close(dilated_attention(q, k, v, spec), dilated_attention(q, k, v, spec, scale=1 / 3))
    assert not torch.allclose(dilated_attention(q, k, v, spec), dilated_attention(q, k, v, spec, scale=1.0))


def test_inside_user_compile_fullgraph_cpu():
    """An enclosing torch.compile(fullgraph=True) traces the CPU route, forward and backward, with no graph break;
    equal shapes do not compile again."""
    spec = DilatedSpec((16, 32), (1, 2), causal=True, overlap="set")
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def f(q, k, v):
        return dilated_attention(torch.tanh(q), k, v, spec)

    for seed in range(3):
        xs = make_inputs(2, 4, 2, 70, 8, seed, torch.float32)
        out = f(*xs)
        (gq,) = torch.autograd.grad(out.square().sum(), xs[0])
        ys = [x.detach().requires_grad_() for x in xs]
        ref = reference_dilated_attention(torch.tanh(ys[0]), ys[1], ys[2], spec)
        (rq,) = torch.autograd.grad(ref.square().sum(), ys[0])
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(gq, rq, rtol=2e-5, atol=2e-5)
    assert counter.frame_count == 1


def test_long_sequence_last_segment_matches_reference():
    """32k tokens through the CPU route (an (N, N) float32 tensor would be 4 GiB); the last rows are exact."""
    spec = DilatedSpec((256, 512), (1, 2))
    q, k, v = (torch.randn(1, 2, 32768, 8) for _ in range(3))
    out = dilated_attention(q, k, v, spec)
    rows = torch.arange(32768 - 512, 32768)
    from flexdilated.reference import reference_rows

    ref, _ = reference_rows(q[:, :, rows], k, v, spec, rows)
    torch.testing.assert_close(out[:, :, rows], ref, rtol=2e-5, atol=2e-5)


def test_inside_user_compile_with_dynamic_lengths():
    """A user's torch.compile(dynamic=True) traces N symbolically: the layout arithmetic must accept it."""
    spec = DilatedSpec((16, 32), (1, 3), causal=True)
    f = torch.compile(lambda q, k, v: dilated_attention(q, k, v, spec), fullgraph=True, backend="aot_eager", dynamic=True)
    for N in (64, 100):
        xs = make_inputs(1, 3, 3, N, 8, N, torch.float32)
        torch.testing.assert_close(f(*xs), reference_dilated_attention(*xs, spec), rtol=2e-5, atol=2e-5)


def test_backward_tiles_only_where_they_were_measured(monkeypatch):
    """Flex's swept backward tiles go to fp16/bf16 at D 64 on sm90 only: elsewhere flex's defaults (None), since a
    tile too large for another GPU's shared memory would not compile."""
    import flexdilated.kernels as kernels

    def q(D=64, dtype=torch.bfloat16, device="cuda"):  # what kernel_options reads of a CUDA tensor
        return SimpleNamespace(shape=(1, 8, 4096, D), dtype=dtype, is_cuda=device == "cuda",
                               device=torch.device(device, 0))

    monkeypatch.setattr(kernels, "_is_sm90", lambda index: True)
    tiles = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32, "bwd_num_stages": 3,
             "bwd_num_warps": 4}
    assert kernels.kernel_options(q()) == tiles
    assert kernels.kernel_options(q(dtype=torch.float16)) == tiles
    for other in (q(dtype=torch.float32), q(D=128), q(D=32), q(device="cpu")):
        assert kernels.kernel_options(other) is None
    monkeypatch.setattr(kernels, "_is_sm90", lambda index: False)
    assert kernels.kernel_options(q()) is None
