"""Packed documents (``document_ids``): equal to the reference on positions counted per document, and to running
each document alone — outputs, LSE and gradients, float64, with padding, causal, grouped heads, GQA, B > 1."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flexdilated import DilatedSpec, LongNetEncoder, LongNetLM, dilated_attention, reference_dilated_attention
from test_attention import make_inputs, problems
from test_strided import (assert_gradients_match, cuda_dispatch_eagerly, inputs, recording_keys, strided_problems,
                          takes_strided_route)


@st.composite
def packed(draw):
    spec, B, H, Hkv, N, D, seed = draw(problems(max_len=60))
    cuts = [sorted(draw(st.sets(st.integers(1, max(N - 1, 1)), max_size=4))) for _ in range(B)]
    ids = torch.zeros(B, N, dtype=torch.int64)
    for b, row in enumerate(cuts):
        for c in row:
            if c < N:
                ids[b, c:] += 1 + c % 3  # ids need only be non-decreasing, not consecutive
    return spec, B, H, Hkv, N, D, seed, ids, draw(st.booleans())


def run(fn, xs, spec, ids, pad, grad_out, grad_lse):
    out, lse = fn(*xs, spec, return_lse=True, key_padding_mask=pad, document_ids=ids)
    reached = lse > float("-inf")
    loss = (out * grad_out).sum() + (lse[reached] * grad_lse[reached]).sum()
    return out, lse, torch.autograd.grad(loss, xs)


@given(packed())
def test_documents_match_the_reference(problem):
    spec, B, H, Hkv, N, D, seed, ids, padded = problem
    xs = make_inputs(B, H, Hkv, N, D, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out, grad_lse = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64), torch.randn(B, H, N, generator=gen)
    pad = torch.rand(B, N, generator=gen) < 0.2 if padded else None
    out, lse, grads = run(dilated_attention, xs, spec, ids, pad, grad_out, grad_lse)
    ref, ref_lse, ref_grads = run(reference_dilated_attention, xs, spec, ids, pad, grad_out, grad_lse)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    reached = lse > float("-inf")
    torch.testing.assert_close(lse[reached], ref_lse[reached], rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def packed_problem(problem, data, padded: bool):
    """A strided problem (`strided_problems`) lengthened by a partial chunk, with (B, N) document ids: up to 3
    document boundaries per row, and if ``padded`` a random key_padding_mask (30 % of keys). Returns spec, B, H, Hkv,
    N, seed, W, ids, pad."""
    spec, B, H, Hkv, N, _, seed = problem
    W = max(spec.segment_lengths)
    N += data.draw(st.integers(0, W - 1))
    assume(takes_strided_route(spec, 1, H, Hkv, W))
    ids = torch.zeros(B, N, dtype=torch.int64)
    for b in range(B):
        for c in data.draw(st.sets(st.integers(1, N - 1), max_size=3)):
            ids[b, c:] += 1
    pad = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) < 0.3 if padded else None
    return spec, B, H, Hkv, N, seed, W, ids, pad


def aligned_fits(ids: torch.Tensor, W: int) -> bool:
    """Whether aligning every document to whole chunks of W at most doubles the tokens (then the packed route runs)."""
    B, N = ids.shape
    lengths = torch.unique_consecutive(ids + torch.arange(B)[:, None] * N, return_counts=True)[1]
    return int((-(-lengths // W) * W).sum()) <= 2 * B * N


@given(strided_problems(), st.data(), st.sampled_from(["bhnd", "bnhd"]), st.booleans())
def test_packed_route_matches_the_reference(problem, data, layout, padded):
    """CUDA's packed route (run eagerly here): the documents aligned to whole chunks in one sequence, the strided
    route over it with the gaps' key blocks skipped; taken whenever aligning at most doubles the tokens."""
    from unittest import mock

    import flexdilated.attention as attention
    import flexdilated.documents as documents

    spec, B, H, Hkv, N, seed, W, ids, pad = packed_problem(problem, data, padded)
    q, k, v = inputs(B, H, Hkv, N, 16, seed, layout)
    results, keys = [], []
    packed = documents.packed_attention
    with cuda_dispatch_eagerly(), recording_keys(keys), \
            mock.patch.object(attention, "packed_attention", lambda *a: results.append(packed(*a)) or results[-1]):
        out, lse = dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad, document_ids=ids)
    assert (results[0] is not None) == aligned_fits(ids, W)
    if results[0] is not None and not padded:  # each document a prefix of its aligned chunks: key bounds, no flags
        assert keys == [torch.int32]
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad,
                                               document_ids=ids)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    reached = lse > float("-inf")
    torch.testing.assert_close(lse[reached], ref_lse[reached], rtol=1e-6, atol=1e-6)


@settings(max_examples=12)  # eager flex's backward on CPU is dense and slow
@given(strided_problems(), st.data(), st.sampled_from(["bhnd", "bnhd"]), st.booleans())
def test_packed_route_gradients_match_the_reference(problem, data, layout, padded):
    """Gradients through CUDA's packed route (run eagerly here: the aligned copies and their gathering backward,
    the strided route over the aligned sequence with the gaps' key blocks skipped) equal the float64 reference's."""
    spec, B, H, Hkv, N, seed, W, ids, pad = packed_problem(problem, data, padded)
    assume(aligned_fits(ids, W))
    q, k, v = (x.requires_grad_() for x in inputs(B, H, Hkv, N, 16, seed, layout))
    with cuda_dispatch_eagerly():
        out, lse = dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad, document_ids=ids)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad,
                                               document_ids=ids)
    assert_gradients_match(out, lse, ref, ref_lse, (q, k, v), seed)


def test_each_document_as_if_alone():
    """The reference's document semantics equal running each document alone (so the property test above checks
    the promise, not only our reading of it)."""
    spec = DilatedSpec((4, 8, 16), (1, 2, 4), causal=True)
    q, k, v = (torch.randn(1, 4, 30, 8, dtype=torch.float64) for _ in range(3))
    ids = torch.tensor([[0] * 7 + [1] * 13 + [5] * 10])
    out = reference_dilated_attention(q, k, v, spec, document_ids=ids)
    for s, e in ((0, 7), (7, 20), (20, 30)):
        alone = reference_dilated_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], spec)
        torch.testing.assert_close(out[:, :, s:e], alone, rtol=1e-12, atol=1e-12)
    one_document = reference_dilated_attention(q, k, v, spec, document_ids=torch.zeros(1, 30, dtype=torch.int64))
    torch.testing.assert_close(one_document, reference_dilated_attention(q, k, v, spec))


@pytest.mark.parametrize(
    "ids, error, match",
    [
        (torch.tensor([[0, 1, 0, 1]]), ValueError, "non-decreasing"),
        (torch.zeros(1, 3, dtype=torch.int64), ValueError, r"shape \(B, N\) = \(1, 4\)"),
        (torch.zeros(1, 4), TypeError, "integer tensor"),
    ],
)
def test_bad_document_ids(ids, error, match):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(error, match=match):
        dilated_attention(q, q, q, DilatedSpec((2,), (1,)), document_ids=ids)


@pytest.mark.parametrize("position", ["rope", "xpos", None])
def test_packed_lm_equals_each_document_alone(position):
    """LongNetLM with document_ids: logits of each document equal the model run on it alone (attention and rotary
    positions restart), and the loss skips the targets that cross a boundary."""
    torch.manual_seed(0)
    model = LongNetLM(40, 32, 2, 4, (4, 8, 16), (1, 2, 4), num_kv_heads=2, position=position).double()
    tokens = torch.randint(0, 40, (2, 23))
    ids = torch.tensor([[0] * 9 + [1] * 14, [3] * 23])
    logits = model(tokens, document_ids=ids)
    for b, spans in ((0, ((0, 9), (9, 23))), (1, ((0, 23),))):
        for s, e in spans:
            torch.testing.assert_close(logits[b : b + 1, s:e], model(tokens[b : b + 1, s:e]), rtol=1e-10, atol=1e-10)
    loss = model.loss(tokens, document_ids=ids)
    per_token = torch.nn.functional.cross_entropy(
        model(tokens[:, :-1], document_ids=ids[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
    ).view(2, 22)
    keep = ids[:, 1:] == ids[:, :-1]
    assert keep.sum() == 43  # the one target across the boundary is skipped
    torch.testing.assert_close(loss, per_token[keep].mean())


def test_packed_encoder_equals_each_document_alone():
    torch.manual_seed(1)
    model = LongNetEncoder(40, 32, 2, 4, (4, 8), (1, 2)).double()
    tokens = torch.randint(0, 40, (1, 17))
    ids = torch.tensor([[0] * 5 + [1] * 12])
    hidden = model(tokens, document_ids=ids)
    torch.testing.assert_close(hidden[:, :5], model(tokens[:, :5]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hidden[:, 5:], model(tokens[:, 5:]), rtol=1e-10, atol=1e-10)


def test_rotary_positions_restart_at_each_document():
    """Scores of RoPE depend on p - t only, so the logits cannot show it: the rotated queries themselves must equal
    those of the document alone (XPOS's scales grow with the position: restarting keeps long packed rows finite)."""
    from flexdilated import MultiheadDilatedAttention, RotaryEmbedding

    torch.manual_seed(2)
    attn = MultiheadDilatedAttention(16, 2, (4,), (1,), rotary=RotaryEmbedding(8, xpos=True)).double()
    seen = []
    attn.rotary.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    attn(x, x, x, is_causal=True, document_ids=torch.tensor([[0] * 5 + [1] * 7]))
    attn(x[:, 5:], x[:, 5:], x[:, 5:], is_causal=True)
    torch.testing.assert_close(seen[0][:, :, 5:], seen[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd", "qkv", "offset"])
@pytest.mark.parametrize("width", [16, 1])  # rows of q, k, v, out (D), of the LSE (1)
def test_aligned_copies_backward_is_their_gather(layout, width):
    """`documents._Align` / `_Unalign` move every token to its aligned place and back with gathers in both
    directions (autograd's own backward would be an index_add). Through any function that maps places to places,
    the pair is the identity on the tokens, so its gradient is that function's: gradcheck in float64, B > 1, one
    and three heads, gaps between the documents and after the last; (B, H, N, D), (B, N, H, D) views, the middle
    slice of a packed (B, N, 3, H, D) qkv (a storage offset of whole rows) and a contiguous tensor one element
    into its storage (an offset that is not, so copied)."""
    from flexdilated.documents import _Align, _places, _Unalign

    B, N, T = 2, 5, 16
    at = torch.tensor([0, 1, 4, 5, 6, 9, 10, 11, 12, 13])  # each token's aligned place (places 2, 3, 7, 8, 14, 15: gaps)
    src = torch.arange(T) % (B * N)
    src[at] = torch.arange(B * N)
    for heads in (3, 1):
        if layout == "qkv":
            qkv = torch.randn(B, N, 3, heads, width, dtype=torch.float64, requires_grad=True)
            x = qkv[:, :, 1].transpose(1, 2)
        elif layout == "offset":
            base = torch.randn(1 + B * heads * N * width, dtype=torch.float64, requires_grad=True)
            x = base[1:].view(B, heads, N, width)
        else:
            x = inputs(B, heads, heads, N, width, heads, layout)[0].requires_grad_()

        places = _places(at, B, heads, T)

        def roundtrip(x):  # a function of each place alone: sin on the places, then the tokens back
            return _Unalign.apply(_Align.apply(x, src, places).sin() * 2, places, B)

        torch.testing.assert_close(roundtrip(x), x.sin() * 2, rtol=0, atol=0)
        assert torch.autograd.gradcheck(roundtrip, (x,))


def test_packed_route_inside_user_compile():
    """A user's torch.compile (not fullgraph: the document starts break the graph) traces the packed route's
    copies (`_Align`, `_Unalign`: autograd Functions over storage views) and gets the reference's result."""
    from unittest import mock

    import flexdilated.attention as attention
    import flexdilated.documents as documents

    spec = DilatedSpec((16, 32), (1, 2), causal=True)
    B, H, N = 2, 4, 150
    q, k, v = inputs(B, H, 2, N, 16, 0, "bnhd")
    ids = (torch.arange(N)[None, :, None] >= torch.tensor([[40, 90], [7, 120]])[:, None, :]).sum(-1)
    taken, packed = [], documents.packed_attention
    torch._dynamo.reset()
    with cuda_dispatch_eagerly(), \
            mock.patch.object(attention, "packed_attention", lambda *a: taken.append(1) or packed(*a)):
        compiled = torch.compile(lambda *x: dilated_attention(*x, spec, document_ids=ids, return_lse=True),
                                 backend="eager")
        out, lse = compiled(q, k, v)
    assert taken  # the packed route, not document by document
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, document_ids=ids, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
