"""The strided route (`flexdilated/strided.py`, CUDA's fast path) on CPU: its views, block tables, placement and
merge run eagerly here (eager flex made to honour the block tables as the kernels do; its device check lifted where
gradients are tested) and must equal the float64 reference, forward and backward. The compiled kernels are checked
on a GPU (`test_gpu.py`)."""

import inspect
import warnings
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from flexdilated import DilatedSpec, dilated_attention, reference_dilated_attention
import flexdilated.strided as strided
from flexdilated.strided import _strided_attention, _tables, head_classes, strided_classes

warnings.filterwarnings("ignore", "flex_attention called without torch.compile")


def dense(num: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Flex's block table (num, index) as a dense bool matrix (..., q blocks, kv blocks)."""
    live = torch.arange(index.shape[-1]) < num[..., None]
    return torch.zeros(index.shape, dtype=torch.bool).scatter(-1, index.long(), live)


def flex_honouring_tables(q, k, v, block_mask, **kwargs):
    """Eager flex as the compiled kernels compute it: eager flex on CPU evaluates only the mask_mod and ignores the
    block tables, so a block wrongly skipped (or wrongly full) would pass unseen. Here a pair counts only in a
    partial block where the mask_mod keeps it, or in a full block. The tables are also checked as the kernels read
    them: contiguous, and the query direction the transpose of the kv direction."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # traced in a user's compile: the tables are checked by the eager tests
        return flex_attention(q, k, v, block_mask=block_mask, **kwargs)
    tables = block_mask.as_tuple()[2:10]  # kv, full kv, q, full q: (num, indices) each
    assert all(t.is_contiguous() for t in tables)
    kv, full, q_dir, full_q = (dense(*tables[a : a + 2]) for a in range(0, 8, 2))
    assert torch.equal(q_dir, kv.transpose(-1, -2)) and torch.equal(full_q, full.transpose(-1, -2))
    mask_mod, block = block_mask.mask_mod, strided.BLOCK_SIZE
    Bt, Ht = kv.shape[:2]

    def honoured(b, h, i, j):
        at = b % Bt, h % Ht, i // block, j // block
        return full[at] | (kv[at] & mask_mod(b, h, i, j))

    bm = type(block_mask)(block_mask.seq_lengths, *block_mask.as_tuple()[2:10], BLOCK_SIZE=block_mask.BLOCK_SIZE,
                          mask_mod=honoured)
    return flex_attention(q, k, v, block_mask=bm, **kwargs)


@pytest.fixture(autouse=True)
def kernels_honour_tables():
    with mock.patch.object(strided, "flex_attention", flex_honouring_tables):
        yield


@st.composite
def strided_problems(draw):
    """Specs the strided route takes: every segment length divides the largest, N a multiple of it. Rates are
    free: ``w % r != 0`` (offsets with L and L - 1 rows) and rows that are no multiple of the 128-block included."""
    W = draw(st.sampled_from([96, 256, 384, 768]))
    divisors = [d for d in range(16, W + 1) if W % d == 0]
    segments = sorted(draw(st.lists(st.sampled_from(divisors), max_size=2)) + [W])  # equal patterns too
    rates = [draw(st.sampled_from([r for r in (1, 2, 3, 4, 5, 6) if r <= w // 8])) for w in segments]
    spec = DilatedSpec(
        segments, rates, causal=draw(st.booleans()), heads=draw(st.sampled_from(["all", "grouped"])),
        overlap=draw(st.sampled_from(["multiset", "set"])),
    )
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    chunks, B = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return spec, B, heads, kv_heads, chunks * W, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def run_strided(q, k, v, spec, slab_out=False, scale=0.5):
    classes = strided_classes(q, k, spec)
    assert classes is not None
    out = torch.full_like(q, float("nan")) if slab_out else None
    tables = _tables(classes, spec.causal, q.device)
    result = _strided_attention(q, k, v, max(spec.segment_lengths), classes, *tables, spec.causal, scale, out=out)
    assert not slab_out or result[0] is out
    return result[:2]


def run_in_groups(q, k, v, spec, slab_chunks, scale=0.5):
    """`strided_attention`'s inference loop with the int32 limit lowered to the smallest group of heads it can
    split q into (calls per batch entry and group of heads), slabs of ``slab_chunks`` chunks (run eagerly)."""
    B, H, N, D = q.shape
    W = max(spec.segment_lengths)
    for G in (G for G in range(1, H + 1) if H % G == 0):
        with mock.patch.object(strided, "INT32_ELEMENTS", G * N * D):
            classes = strided_classes(q, k, spec)
        if classes is not None:
            break
    with mock.patch.object(strided, "INT32_ELEMENTS", G * N * D), \
            mock.patch.object(strided, "SLAB_ELEMENTS", slab_chunks * G * W * D), \
            mock.patch.object(strided, "_compiled", strided._strided_attention):
        out, lse, tail = strided.strided_attention(q, k, v, spec, classes, scale)
    assert all(x.shape[2] == 0 for x in tail)  # whole chunks: no tail
    return out, lse


def takes_strided_route(spec: DilatedSpec, B: int, H: int, Hkv: int, N: int) -> bool:
    """Whether the whole chunks of (B, H, N) queries and (B, Hkv, N) keys take the strided route."""
    N -= N % max(spec.segment_lengths)
    return strided_classes(torch.empty(B, H, N, 16), torch.empty(B, Hkv, N, 16), spec) is not None


@given(strided_problems())
def test_strided_route_matches_reference(problem):
    spec, B, H, Hkv, N, in_groups, seed = problem
    assume(takes_strided_route(spec, B, H, Hkv, N))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, N, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    if in_groups:  # the smallest group of heads, one chunk per slab
        out, lse = run_in_groups(q, k, v, spec, 1)
    else:
        out, lse = run_strided(q, k, v, spec, slab_out=seed % 2 == 1)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    reached = lse > float("-inf")
    torch.testing.assert_close(lse[reached].float(), ref_lse[reached], rtol=1e-6, atol=1e-6)


def assert_gradients_match(out, lse, ref, ref_lse, xs, seed):
    """The gradients of q, k and v through (out, lse) equal those through the reference's (ref, ref_lse), for random
    cotangents: to 1e-9 from the output, to 1e-5 from the LSE, which flex returns in float32 whatever the inputs'
    dtype."""
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
    grad_lse = torch.randn(ref_lse.shape, generator=gen, dtype=ref.dtype)
    reached = ref_lse > float("-inf")
    from_out = (out * grad_out).sum(), (ref * grad_out).sum(), 1e-9
    from_lse = (lse[reached] * grad_lse[reached]).sum(), (ref_lse[reached] * grad_lse[reached]).sum(), 1e-5
    for loss, ref_loss, tol in (from_out, from_lse):
        got = torch.autograd.grad(loss, xs, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref_loss, xs, retain_graph=True, allow_unused=True)
        for a, b, x in zip(got, want, xs):  # v: none from the LSE (zeros, or not in the graph)
            zero = torch.zeros_like(x)
            torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=tol, atol=tol)


@settings(max_examples=15)  # eager flex's backward on CPU is dense and slow: ≈ 3 s an example
@given(strided_problems())
def test_strided_route_gradients_match_reference(problem):
    """Gradients through the route (flex's own backward, run eagerly here, honouring the block tables; the
    placement and the merge differentiated by autograd) equal the float64 reference's."""
    spec, B, H, Hkv, N, _, seed = problem
    assume(takes_strided_route(spec, B, H, Hkv, N))
    q, k, v = (x.requires_grad_() for x in inputs(B, H, Hkv, N, 16, seed, "bhnd"))
    with mock.patch.object(torch.nn.attention.flex_attention, "_validate_device", lambda *a: None):  # CPU: grad
        out, lse = run_strided(q, k, v, spec)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    assert_gradients_match(out, lse, ref, ref_lse, (q, k, v), seed)


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
    "spec, N, taken",
    [
        (DilatedSpec((2048, 4096), (1, 2)), 6144, False),  # N not a multiple of the largest segment
        (DilatedSpec((2048, 6144), (1, 3)), 6144, True),  # 2048 divides 6144
        (DilatedSpec((2048, 3072), (1, 2)), 6144, False),  # 2048 does not divide 3072
        (DilatedSpec((2048, 4096), (1, 3)), 8192, True),  # w % r != 0: offsets 0 and 1 have 1366 rows, 2 has 1365
        (DilatedSpec((512, 4096), (8, 4)), 8192, True),  # w / r = 64 rows: less than one block
    ],
)
def test_which_specs_take_the_strided_route(spec, N, taken):
    assert (strided_classes(torch.empty(1, 8, N, 16), torch.empty(1, 8, N, 16), spec) is not None) == taken


@pytest.mark.parametrize(
    "spec, H, N, expected",
    [
        (DilatedSpec((2048, 4096, 8192), (1, 2, 4)), 8, 4 * 2**20, 8),  # 2**31 elements: one call
        (DilatedSpec((2048, 4096, 8192), (1, 2, 4)), 8, 8 * 2**20, 4),  # heads 0-3 and 4-7: the same offsets
        (DilatedSpec((2048, 4096, 8192), (1, 2, 4)), 8, 16 * 2**20, None),  # 2 heads: 0-1 and 2-3 differ
        (DilatedSpec((2048, 4096, 8192), (1, 2, 4), heads="grouped"), 6, 8 * 2**20, None),  # groups differ
        (DilatedSpec((2048, 4096), (1, 2), heads="grouped"), 8, 8 * 2**20, None),
    ],
)
def test_heads_per_call_past_int32(spec, H, N, expected):
    classes = head_classes(spec, H, H)
    assert strided._heads_per_call(classes, 1, H, H, N, 64) == expected


def test_paper_spec_rows_per_offset():
    """The paper's w = 16384, r = 6: offsets 0..3 read 2731 tokens of a segment, offsets 4, 5 read 2730."""
    spec = DilatedSpec((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
    classes = strided_classes(torch.empty(1, 12, 32768, 16), torch.empty(1, 12, 32768, 16), spec)
    q = torch.empty(1, 12, 1, 32768, 16)
    from flexdilated.strided import _folded_view

    rows = {c.offset: _folded_view(q, c.q_heads, 16384, 6, c.offset, "heads").shape[2] for c in classes if c.branch.rate == 6}
    assert rows == {0: 2731, 1: 2731, 2: 2731, 3: 2731, 4: 2730, 5: 2730}


@pytest.mark.parametrize("heads_per_call", [8, 4])
def test_traced_inside_a_user_compile(heads_per_call):
    """Under a user's torch.compile(fullgraph=True) the route is traced in place (CUDA runs it this way), also
    when it runs per batch entry and group of heads (past 2**31 elements; the limit lowered here)."""
    spec = DilatedSpec((128, 256, 512), (1, 2, 4), causal=True)
    q, k, v = (torch.randn(2, 8, 1024, 16, dtype=torch.float64) for _ in range(3))

    def f(q, k, v):
        return strided.strided_attention(q * 2, k, v, spec, strided_classes(q, k, spec), 0.5)[0]

    with mock.patch.object(strided, "INT32_ELEMENTS", heads_per_call * 1024 * 16):  # 8: one call per batch entry
        out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(out, reference_dilated_attention(q * 2, k, v, spec, scale=0.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("overlap", ["multiset", "set"])
def test_equal_patterns_are_merged_as_two(overlap):
    """Two equal (w, r) patterns are two branches: multiset counts their keys twice (LSE + log 2), set once."""
    spec = DilatedSpec((48, 96, 96), (1, 2, 2), overlap=overlap)
    q, k, v = (torch.randn(1, 4, 192, 16, dtype=torch.float64) for _ in range(3))
    out, lse = run_strided(q, k, v, spec)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)



@contextmanager
def cuda_dispatch_eagerly():
    """`dilated_attention`'s CUDA dispatch run eagerly on CPU (eager flex honouring the block tables; its device
    check lifted, so that it runs the backward too)."""
    import flexdilated.attention as attention
    import flexdilated.kernels as kernels
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    def eager_flex(q, k, v, block_mask, scale):
        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse

    with mock.patch.object(attention, "_use_flex", lambda x: True), \
            mock.patch.object(kernels, "_flex", eager_flex), \
            mock.patch.object(strided, "_compiled", strided._strided_attention), \
            mock.patch.object(strided, "flex_attention", flex_honouring_tables), \
            mock.patch.object(torch.nn.attention.flex_attention, "_validate_device", lambda *a: None):
        yield


def recording_keys(kinds: list):
    """`strided._validity` patched to append the dtype of the keys each call gets: bool (flags per key) or int32
    (bounds per chunk)."""
    validity = strided._validity

    def spy(*args, **kwargs):
        kinds.append(inspect.signature(validity).bind(*args, **kwargs).arguments["keys"].dtype)
        return validity(*args, **kwargs)

    return mock.patch.object(strided, "_validity", spy)


def inputs(B, H, Hkv, N, D, seed, layout):
    """float64 q, k, v (B, H, N, D); ``layout="bnhd"``: stored (B, N, H, D) and passed as ``.transpose(1, 2)``
    views, as modules do."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, N, h, D, generator=gen, dtype=torch.float64).transpose(1, 2) \
        if layout == "bnhd" else torch.randn(B, h, N, D, generator=gen, dtype=torch.float64)  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


def test_grouped_heads_with_a_pattern_that_has_no_head():
    """Two heads, three patterns (heads="grouped"): the largest pattern gets no head, so no class, yet the chunks are
    those of the spec's largest segment (the graph cut them at the largest class segment once, found by hypothesis
    on the packed route)."""
    spec = DilatedSpec((16, 24, 96), (1, 1, 1), heads="grouped")
    q, k, v = inputs(1, 2, 1, 2 * 96 + 40, 16, 0, "bhnd")
    assert {c.branch.segment for c in strided_classes(q[:, :, :192], k[:, :, :192], spec)} == {16, 24}
    with cuda_dispatch_eagerly():
        out, lse = dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("heads, merged", [("grouped", False), ("all", True)])
def test_grouped_heads_concatenate_without_a_merge(heads, merged):
    """With heads="grouped" every head is in one pattern: the patterns' results are concatenated (no merge
    weights come back), and equal the reference; with heads="all" they are merged (one weight per pattern)."""
    spec = DilatedSpec((32, 64, 128), (1, 2, 4), causal=True, heads=heads)
    q, k, v = inputs(2, 7, 7, 256, 16, 3, "bhnd")  # groups of 3, 2, 2 heads
    classes = strided_classes(q, k, spec)
    result = _strided_attention(q, k, v, 128, classes, *_tables(classes, True, q.device), True, 0.5)
    assert len(result) == 2 + 3 + 3 * merged  # out, lse, q, k, v's (empty) tails, a weight per pattern
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
    torch.testing.assert_close(result[0], ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(result[1] == float("-inf"), ref_lse == float("-inf"))
    reached = ref_lse > float("-inf")
    torch.testing.assert_close(result[1][reached].float(), ref_lse[reached], rtol=1e-6, atol=1e-6)


def test_backward_saves_the_class_outputs_not_their_placed_copies(monkeypatch):
    """What the compiled route keeps for its backward, as Inductor's partitioner decides it (here without its
    kernels): q, k, v, flex's class outputs (which flex's backward needs: 1/r of q's size for a pattern of rate
    r) and per-row tensors. The merge weights each class output in its own layout, so no copy of the outputs
    placed in natural order is kept beside them (5.5 q-sizes were kept before, 2.0 now: `perf/NOTES.md`
    attempt 16)."""
    monkeypatch.setattr(torch.nn.attention.flex_attention, "_validate_device", lambda *a: None)  # CPU: no grad
    spec = DilatedSpec((256, 512, 1024), (1, 2, 4))
    q, k, v = (torch.randn(2, 8, 2048, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    classes = strided_classes(q, k, spec)
    saved = {}

    def pack(x):
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    compiled = torch.compile(_strided_attention, backend="aot_eager_decomp_partition", fullgraph=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        compiled(q, k, v, 1024, classes, *_tables(classes, False, q.device), False, 0.125)
    kept = sum(n for at, n in saved.items() if at not in {x.untyped_storage().data_ptr() for x in (q, k, v)})
    row_bytes = 2 * 8 * 2048 * 4  # one float32 value per (b, h, row)
    class_outputs = q.nbytes * (1 + 1 / 2 + 1 / 4)
    assert class_outputs <= kept <= class_outputs + 12 * row_bytes, kept / q.nbytes


def key_padding(kind: str | None, B: int, N: int, seed: int) -> torch.Tensor | None:
    """A (B, N) key_padding_mask: None; "holes": random keys, and the end of the last row; "ends": rows padded on the
    right or the left, by random lengths (some rows all padding)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "holes":
        pad = torch.rand(B, N, generator=gen) < 0.3
        pad[-1, N // 2 :] = True
        return pad
    if kind == "ends":
        cut = torch.randint(0, N + 1, (B, 1), generator=gen)
        j = torch.arange(N)
        return torch.where(torch.rand(B, 1, generator=gen) < 0.5, j >= cut, j < cut)
    return None


def gradient_edges(root, x: torch.Tensor) -> int:
    """How many gradients autograd sums into the leaf x: the edges into its AccumulateGrad from the graph of root."""
    seen, todo, edges = set(), [root.grad_fn], 0
    while todo:
        node = todo.pop()
        for fn, _ in node.next_functions:
            if fn is None:
                continue
            edges += getattr(fn, "variable", None) is x
            if fn not in seen:
                seen.add(fn)
                todo.append(fn)
    return edges


def test_tail_gradients_join_the_chunks_in_the_compiled_call():
    """With N % W tokens left over, the gather route attends the tail's copies made by the compiled call (AOT, as on
    CUDA), so q, k and v each get one gradient, written by its backward, not also a full-size one from a slice of
    the tail taken outside (`perf/NOTES.md` attempt 18); the gradients equal the reference's (those of the chunks as
    closely as flex's float32 LSE allows: the eager tests above check them to 1e-9)."""
    spec = DilatedSpec((64, 128), (1, 2), causal=True)
    q, k, v = (x.requires_grad_() for x in inputs(2, 4, 2, 2 * 128 + 40, 16, 5, "bhnd"))
    compiled = torch.compile(_strided_attention, backend="aot_eager", fullgraph=True)
    with cuda_dispatch_eagerly(), mock.patch.object(strided, "_compiled", compiled), \
            torch._functorch.config.patch(donated_buffer=False):  # the check below runs the backward twice
        out, lse = dilated_attention(q, k, v, spec, scale=0.5, return_lse=True)
        assert [gradient_edges(out, x) for x in (q, k, v)] == [1, 1, 1]
        ref = reference_dilated_attention(q, k, v, spec, scale=0.5)
        grad = torch.randn_like(ref)
        got, want = (torch.autograd.grad((x * grad).sum(), (q, k, v)) for x in (out, ref))
    for a, b in zip(got, want):  # the tail's exactly; the chunks' through flex's compiled backward, which recomputes
        torch.testing.assert_close(a[:, :, 256:], b[:, :, 256:], rtol=1e-10, atol=1e-10)  # from its float32 LSE
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=12)  # eager flex's backward on CPU is dense and slow
@given(strided_problems(), st.integers(1, 10**6), st.sampled_from(["bhnd", "bnhd"]),
       st.sampled_from([None, "holes", "ends"]))
def test_dispatch_gradients_match_reference(problem, tail, layout, padded):
    """Gradients through `dilated_attention`'s CUDA dispatch (run eagerly here): the strided route on the whole
    chunks (the batch folded into flex's heads or segments, padded key blocks skipped) and the gather route on the
    tail, together, equal the float64 reference's."""
    spec, B, H, Hkv, N, _, seed = problem
    W = max(spec.segment_lengths)
    N += tail % W
    assume(takes_strided_route(spec, B, H, Hkv, N))
    q, k, v = (x.requires_grad_() for x in inputs(B, H, Hkv, N, 16, seed, layout))
    pad = key_padding(padded, B, N, seed)
    with cuda_dispatch_eagerly():
        out, lse = dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad)
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad)
    assert_gradients_match(out, lse, ref, ref_lse, (q, k, v), seed)


@given(strided_problems(), st.integers(1, 10**6), st.sampled_from(["bhnd", "bnhd"]),
       st.sampled_from([None, "holes", "ends"]))
@example((DilatedSpec((256,), (1,)), 2, 1, 1, 256, False, 0), 256, "bnhd", None)  # one head, one chunk, B 2
def test_any_length_layout_and_padding_on_the_strided_route(problem, tail, layout, padded):
    """`dilated_attention`'s CUDA dispatch (run eagerly here): N = C * W + t takes the strided route on the C whole
    chunks and the gather route on the last t tokens, in either memory layout (the batch folded into flex's heads
    or segments), with key padding (padded key blocks skipped; random "holes", flags per key, or padding at the
    "ends" of rows, bounds per segment); together they equal the reference."""
    import flexdilated.attention as attention

    spec, B, H, Hkv, N, _, seed = problem
    W = max(spec.segment_lengths)
    N += tail % W
    assume(takes_strided_route(spec, B, H, Hkv, N))
    q, k, v = inputs(B, H, Hkv, N, 16, seed, layout)
    pad = key_padding(padded, B, N, seed)
    taken, folds, keys = [], [], []
    fold = strided._batch_fold
    with cuda_dispatch_eagerly(), recording_keys(keys), \
            mock.patch.object(strided, "_batch_fold", lambda *a: folds.append(fold(*a)) or folds[-1]), \
            mock.patch.object(attention, "strided_attention", lambda *a: taken.append(a[0].shape[2]) or
                              strided.strided_attention(*a)):
        out, lse = dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad)
    assert taken == [N]  # the strided route on the whole chunks (it leaves the last N % W tokens)
    if padded != "holes":  # no padding: no key tables; padding at the ends: bounds, not flags (holes: either)
        assert keys == ([] if pad is None else [torch.int32])
    if layout == "bnhd" and N % W == 0:  # the batch folds into flex's segments: one flex call per class
        one_view = H == 1 and N == W  # one head and one chunk: both folds view the same memory, either may be taken
        assert set(folds) == {"heads"} if B == 1 else set(folds) == {"segments"} or one_view and None not in folds
    ref, ref_lse = reference_dilated_attention(q, k, v, spec, scale=0.5, return_lse=True, key_padding_mask=pad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    reached = lse > float("-inf")
    torch.testing.assert_close(lse[reached], ref_lse[reached], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout, B", [("bhnd", 2), ("bhnd", 1), ("bnhd", 2)])
@pytest.mark.parametrize("keys", ["flags", "bounds"])
def test_validity_tables_are_flex_tables(layout, B, keys):
    """The per-(entry, segment) tables of key padding and documents, as flex's kernels read them: contiguous (they
    index them as such), the q direction the transpose of the kv direction, no skipped block holding a valid key
    and no visited one without, given key flags or key bounds, and row bounds. (The GPU backward of packed
    documents returned wrong dk, dv when the q tables came out of argsort transposed.)"""
    spec = DilatedSpec((256, 512), (1, 2), causal=True)
    q, k, v = inputs(B, 4, 2, 1024, 16, 0, layout)
    classes = strided_classes(q, k, spec)
    chunks = [x.unflatten(2, (2, 512)) for x in (q, k, v)]
    gen = torch.Generator().manual_seed(0)
    if keys == "flags":
        key_ok = (torch.rand(B, 1024, generator=gen) < 0.7).unflatten(1, (2, 512))
        key_ok[:, 1, 300:] = False  # whole blocks without a valid key
        given = key_ok
    else:
        key_ok = torch.zeros(B, 2, 512, dtype=torch.bool)
        key_ok[:, 0, 3:] = True  # left padding
        key_ok[:, 1, :300] = True  # right padding, whole blocks without a valid key
        given = strided._bounds(key_ok)
        assert given.tolist() == [[[3, 512], [0, 300]]] * B
    rows = torch.tensor([[0, 512], [0, 256]]).expand(B, 2, 2)  # chunk 1: whole query blocks without a row
    valid = strided._validity(*chunks, classes, True, given, rows)
    positions, _, _, first, _ = strided._class_rows(classes, True, 512, q.device)
    row_keys = torch.nn.functional.pad(key_ok, (0, 1))[:, :, positions]  # each class segment's key flags
    for cls, start, per_call in zip(classes, first, valid):
        nk = per_call[0][0][1].shape[-1]
        flags = row_keys[:, :, start : start + 512 // cls.branch.segment, : nk * strided.BLOCK_SIZE].flatten(1, 2)
        for b, (t, class_keys) in enumerate(per_call):
            entry = flags if len(per_call) == 1 else flags[b : b + 1]  # one call per batch entry
            assert all(x.is_contiguous() for x in t)
            kv, full_kv, q_dir, full_q = (dense(*t[a : a + 2]) for a in range(0, 8, 2))
            assert torch.equal(q_dir, kv.transpose(-1, -2)) and torch.equal(full_q, full_kv.transpose(-1, -2))
            assert not (kv & full_kv).any()
            reach = (kv | full_kv).any(-2)  # kv blocks reached by some query block
            blocks = entry.unflatten(-1, (-1, strided.BLOCK_SIZE)).any(-1)  # kv blocks holding a valid key
            fold = strided._batch_fold(*chunks, cls) or "heads"
            if fold == "heads":  # tables (S, B * n), keys (B, S, .)
                blocks = blocks.transpose(0, 1)[:, :, None]
                reach = reach.unflatten(1, (entry.shape[0], -1))
            else:  # tables (B * S, n), keys (B * S, .)
                blocks, entry = blocks.flatten(0, 1)[:, None], entry.flatten(0, 1)
            assert not (reach & ~blocks).any()  # no block without a valid key is visited
            if keys == "bounds":  # the mask_mod's test j in [lo, hi) keeps exactly the valid keys
                j = torch.arange(entry.shape[-1])
                assert class_keys.dtype == torch.int32
                assert torch.equal((j >= class_keys[..., :1]) & (j < class_keys[..., 1:]), entry)
            else:
                assert torch.equal(class_keys, entry)
