"""The compiled flex kernels on CUDA against the float64 reference, up to N = 65,536, forward and backward.

Run on a GPU: ``pytest -m gpu``. The reference is evaluated in slabs of query rows under activation
checkpointing, so its memory stays O(slab * N) while computing exactly the formula of SPEC §1.
"""

from unittest import mock

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from flexdilated import DilatedSpec, dilated_attention
from flexdilated.reference import reference_rows
import flexdilated.strided as strided
from flexdilated.strided import strided_classes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

W1 = ((2048, 4096, 8192), (1, 2, 4))
PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 2e-3}


def reference_slabbed(q, k, v, spec, slab=128, key_padding_mask=None, document_ids=None):
    outs, lses = [], []
    for a in range(0, q.shape[2], slab):
        rows = torch.arange(a, min(a + slab, q.shape[2]), device=q.device)
        out, lse = checkpoint(reference_rows, q[:, :, a : a + slab], k, v, spec, rows, None, key_padding_mask,
                              document_ids=document_ids, use_reentrant=False)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles its own kernels: a process running many configurations would otherwise pass Dynamo's
    recompile limit (8 per code object), which one model with one spec never approaches."""
    torch._dynamo.reset()
    yield


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


BF16 = {torch.bfloat16: TOLERANCE[torch.bfloat16]}
# (patterns, B, H, Hkv, N, causal, heads, overlap, dtypes): N a multiple of the largest segment takes the strided
# route, the rest the gather route (README: routes)
CASES = [
    (W1, 1, 8, 8, 65536, False, "all", "multiset", TOLERANCE),  # strided
    (W1, 1, 8, 8, 65536, True, "all", "set", BF16),  # strided, set exclusions as whole blocks
    (W1, 1, 8, 2, 32768, True, "all", "multiset", BF16),  # strided, GQA through flex's enable_gqa
    (W1, 1, 8, 8, 32768, False, "grouped", "multiset", BF16),  # strided, one class per group
    (W1, 2, 8, 8, 16384, True, "all", "multiset", BF16),  # strided, batch of 2
    (W1, 1, 8, 2, 50000, False, "all", "multiset", TOLERANCE),  # gather: tails
    (PAPER, 1, 12, 12, 65536, True, "all", "multiset", BF16),  # strided, w % r != 0: rows per offset differ
    (PAPER, 1, 12, 6, 65536, False, "all", "set", BF16),  # strided, w % r != 0, GQA 12/6, set
    (PAPER, 1, 12, 4, 40000, True, "all", "set", BF16),  # gather: tails
    (((2048, 4096), (2, 4)), 1, 4, 4, 10000, False, "all", "multiset", BF16),  # odd rows of even heads reach nothing
    (((2048, 2**40), (1, 8)), 1, 8, 8, 10000, True, "all", "multiset", BF16),  # a "whole sequence" segment
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[1]}H{c[2]}kv{c[3]}-N{c[4]}-{'causal' if c[5] else 'full'}-{c[6]}-{c[7]}-w{max(c[0][0])}")
def test_compiled_kernel_matches_reference(case):
    (w, r), B, H, Hkv, N, causal, heads, overlap, dtypes = case
    spec = DilatedSpec(w, r, causal=causal, heads=heads, overlap=overlap)
    gen = torch.Generator(device="cuda").manual_seed(N + H)
    shape_q, shape_kv = (B, H, N, 64), (B, Hkv, N, 64)
    # values representable in bf16, so both dtypes and the reference see the same inputs
    q, k, v = (torch.randn(s, generator=gen, device="cuda").bfloat16().double() for s in (shape_q, shape_kv, shape_kv))
    grad = torch.randn(shape_q, generator=gen, device="cuda").bfloat16().double()
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_slabbed(*ref_in, spec)
    ref_grads = torch.autograd.grad((ref_out * grad).sum(), ref_in)
    finite = ref_lse > float("-inf")
    route = "strided" if strided_classes(q, k, spec) is not None else "gather"
    for dtype, tol in dtypes.items():
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse = dilated_attention(*xs, spec, return_lse=True)
        grads = torch.autograd.grad((out * grad.to(dtype)).sum(), xs)
        errors = {"out": rel(out, ref_out)} | {n: rel(g, rg) for n, g, rg in zip("qkv", grads, ref_grads)}
        print(f"{route} {dtype} {errors}")
        assert all(e < tol for e in errors.values()), (dtype, errors)
        assert torch.equal(lse == float("-inf"), ~finite)
        assert (out[~finite[..., None].expand_as(out)] == 0).all()
        assert (lse[finite] - ref_lse[finite]).abs().max().item() < 50 * tol


# (name, B, Hkv, N, causal, heads, layout, padding, documents): the shapes of training on the strided route
REAL_SHAPES = [
    ("views", 2, 8, 16384, True, "all", "bnhd", False, False),  # the batch folded into flex's segments
    ("grouped-views", 2, 4, 16384, False, "grouped", "bnhd", False, False),
    ("padding", 2, 8, 20000, True, "all", "bhnd", "ends", False),  # key bounds: right, left padding; a tail
    ("padding-holes", 2, 8, 20000, False, "all", "bhnd", "holes", False),  # key flags: random padded keys
    ("documents", 2, 4, 20000, True, "all", "bnhd", "holes", True),  # aligned documents, padding inside them
    ("documents-ends", 2, 4, 20000, True, "all", "bnhd", "ends", True),  # documents as key bounds
]


@pytest.mark.parametrize("case", REAL_SHAPES, ids=lambda c: c[0])
def test_real_shapes_match_reference(case):
    """Module layouts, key padding and packed documents on the compiled strided route, bf16, forward and backward,
    against the float64 reference."""
    name, B, Hkv, N, causal, heads, layout, padded, packed = case
    spec = DilatedSpec(*W1, causal=causal, heads=heads)
    gen = torch.Generator(device="cuda").manual_seed(N)

    def make(h):
        x = torch.randn(B, N, h, 64, generator=gen, device="cuda").bfloat16()
        return x.transpose(1, 2) if layout == "bnhd" else x.transpose(1, 2).contiguous()

    q, k, v = make(8), make(Hkv), make(Hkv)
    grad = torch.randn(B, 8, N, 64, generator=gen, device="cuda").bfloat16()
    extra = {}
    if padded == "holes":
        pad = torch.rand(B, N, generator=gen, device="cuda") < 0.05
        pad[:, N - N // 10 :] = True
        extra["key_padding_mask"] = pad
    elif padded == "ends":  # row 0 padded at the end, row 1 at the start
        j = torch.arange(N, device="cuda")
        extra["key_padding_mask"] = torch.stack((j >= N - N // 10, j < 3000))
    if packed:
        cuts = torch.tensor([[0, 5000, 5100, 13000], [0, 9000, 9000, 9000]], device="cuda")  # aligned: 65,536 tokens
        extra["document_ids"] = (torch.arange(N, device="cuda")[None, :, None] >= cuts[:, None, :]).sum(-1)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_slabbed(*ref_in, spec, slab=512, **extra)
    ref_grads = torch.autograd.grad((ref_out * grad.double()).sum(), ref_in)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    import flexdilated.attention as attention

    route = attention.packed_attention
    with mock.patch.object(attention, "packed_attention", lambda *a: taken.append(route(*a)) or taken[-1]):
        taken = []
        out, lse = dilated_attention(*xs, spec, return_lse=True, **extra)
    assert [x is not None for x in taken] == [True] * packed  # the packed route, not document by document
    grads = torch.autograd.grad((out * grad).sum(), xs)
    errors = {"out": rel(out, ref_out)} | {n: rel(g, rg) for n, g, rg in zip("qkv", grads, ref_grads)}
    print(name, errors)
    tol = TOLERANCE[torch.bfloat16]
    assert all(e < tol for e in errors.values()), errors
    finite = ref_lse > float("-inf")
    assert torch.equal(lse == float("-inf"), ~finite)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < 50 * tol


@pytest.mark.parametrize("overlap", ["multiset", "set"])
def test_no_recompile_across_lengths_and_calls(overlap):
    """Once each route has compiled for a spec (strided: a first, static N and a second one, after which N is
    symbolic; gather: the tails), no N compiles again."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    # tails of 0, 1, 3 segments; the strided route's second N per spec makes N symbolic
    warm_up = [(16384, False), (24576, False), (32768, True), (50000, True), (60000, False), (40000, True)]
    check = [(65536, False), (24576, True), (40000, True), (16384, True), (65536, True), (57000, False)]
    for step, (N, causal) in enumerate(warm_up + check):
        spec = DilatedSpec(*W1, causal=causal, overlap=overlap)
        q, k, v = (torch.randn(1, 8, N, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        out = dilated_attention(q, k, v, spec)
        out.sum().backward()
        if step == len(warm_up) - 1:
            warm = counters["stats"]["unique_graphs"]
        if (N, causal) == (24576, True):  # a graph with N symbolic (the causal spec saw 32,768 and 49,152) is exact
            exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
            ref, _ = reference_slabbed(*exact, spec, slab=1024)
            ref_grads = torch.autograd.grad(ref.sum(), exact)
            errors = [rel(out, ref)] + [rel(x.grad, g) for x, g in zip((q, k, v), ref_grads)]
            assert all(e < TOLERANCE[torch.bfloat16] for e in errors), errors
    print("compiled graphs:", warm, dict(counters["stats"]))
    assert counters["stats"]["unique_graphs"] == warm


def test_inside_user_compile_fullgraph():
    spec = DilatedSpec(*W1, causal=True)
    q, k, v = (torch.randn(2, 8, 16384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return dilated_attention(q * 2, k, v, spec)

    eager = f(q, k, v)
    (ge,) = torch.autograd.grad(eager.float().square().sum(), q)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    (gc,) = torch.autograd.grad(compiled.float().square().sum(), q)
    assert rel(compiled, eager) < 1e-2 and rel(gc, ge) < 1e-2


def test_inside_user_compile_static_shapes_at_four_chunks():
    """A user's torch.compile traces the route in place, with static shapes (as the route's own first compile is).
    There, at B 1 with 4 chunks, Triton miscompiled the kernel summing the classes' gradients read through strided
    slices: dq 28 % wrong, 37 % at its worst element (`perf/NOTES.md` attempt 20). Out and every gradient against the
    float64 reference, in norm and element by element."""
    spec = DilatedSpec(*W1, causal=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 32768, 64, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 32768, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
    grad = torch.randn(1, 8, 32768, 64, device="cuda", generator=gen).bfloat16()
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = torch.compile(lambda q, k, v: dilated_attention(q, k, v, spec), fullgraph=True)(*xs)
    compiled = (out, *torch.autograd.grad((out * grad).sum(), xs))
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = reference_slabbed(*exact, spec, slab=1024)
    reference = (ref_out, *torch.autograd.grad((ref_out * grad.double()).sum(), exact))
    errors = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), compiled, reference)}
    print(errors)
    assert all(e < TOLERANCE[torch.bfloat16] for e in errors.values()), errors
    for name, a, b in zip(("out", "dq", "dk", "dv"), compiled, reference):  # measured ≤ 0.6 % when right
        largest = (a.double() - b).abs().max().item()
        assert largest <= 5e-2 * b.abs().max().item(), (name, largest)


def test_forward_memory_is_bounded_by_slabs(monkeypatch):
    """Inference at N = 1,048,576 (W1, bf16, strided route in slabs of 2**27 elements of q): peak memory over the
    bytes of q, k, v and out stays at most 1.25 (the perf issue's target; measured 1.13. The default slab,
    2**29, makes this one call: 1.46, and 37 % faster)."""
    monkeypatch.setattr(strided, "SLAB_ELEMENTS", 2**27)
    q, k, v = (torch.randn(1, 8, 2**20, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    spec = DilatedSpec(*W1)
    with torch.no_grad():
        dilated_attention(q, k, v, spec)  # compile outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = dilated_attention(q, k, v, spec)
        torch.cuda.synchronize()
    ratio = (torch.cuda.max_memory_allocated() - base + 3 * q.nbytes) / (4 * q.nbytes)
    print(f"peak / (q, k, v, out) = {ratio:.3f}")
    assert ratio <= 1.25
    # the slabbed inference computes what one call with autograd computes
    one_call = dilated_attention(q.requires_grad_(), k, v, spec).detach()
    assert rel(out, one_call) < 5e-3, rel(out, one_call)


def test_longnet_lm_compiles_once_per_length_on_cuda():
    """A user's ``torch.compile(LongNetLM, fullgraph=True)`` with Inductor on CUDA (bf16 autocast): training steps
    equal eager, three steps at N = 2W compile once, N = 3W recompiles once with N symbolic, 4W and 6W reuse it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from flexdilated import LongNetLM

    W = 2048
    torch.manual_seed(0)
    model = LongNetLM(256, 128, 2, 8, (512, 1024, W), (1, 2, 4)).cuda()  # w / r = 512: the strided route
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator(device="cuda").manual_seed(0)
    counts = []
    for k in (2, 2, 2, 3, 4, 6):
        tokens = torch.randint(0, 256, (2, k * W + 1), device="cuda", generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:].flatten()
        with torch.autocast("cuda", torch.bfloat16):
            logits = compiled(x)
            with torch.no_grad():
                eager = model(x)
        assert rel(logits, eager) < 2e-2
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad()
        counts.append(counter.frame_count)
    assert counts == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_spanning_pattern_kernel_matches_dense(dtype):
    """The rectangular flex call of a spanning pattern (distributed.py: local query rows of one offset against the
    sparsified keys of g = 4 shards, true positions, causal, a set exclusion) equals the dense float64 route."""
    from flexdilated.distributed import _mask_mod, _rows
    from flexdilated.kernels import math_route_rect

    n, r, g, j, H = 4096, 4, 4, 2, 8
    dev = torch.device("cuda")
    offsets = torch.arange(H, device=dev) % r
    q_idx, q_ok = _rows(offsets, torch.tensor(j, device=dev), n, r)
    shard = torch.arange(g, device=dev)[:, None]
    k_all, k_ok = _rows(offsets[:r][None], shard, n, r)
    k_pos = (shard[..., None] * n + k_all).transpose(0, 1).flatten(1)
    earlier = ((2048, 1, (0,) * H),)
    mask_mod = _mask_mod(q_ok, j * n + q_idx, k_ok.transpose(0, 1).flatten(1), k_pos, offsets, True, earlier, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(2, H, n // r, 64, device=dev, generator=gen, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, H, g * n // r, 64, device=dev, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2))
    out, lse = math_route_rect(q, k, v, mask_mod, 0.125)
    (out.float().square().sum() + lse.sum()).backward()
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = math_route_rect(*exact, mask_mod, 0.125)
    (ref.square().sum() + ref_lse.sum()).backward()
    tol = TOLERANCE[dtype]
    assert rel(out, ref) < tol and rel(lse, ref_lse) < tol
    for a, b in zip((q, k, v), exact):
        assert rel(a.grad, b.grad) < tol


def test_sequence_parallel_world_size_one_on_cuda(tmp_path):
    """World size 1 through the sequence-parallel entry point with NCCL: the single-GPU fast path, same result."""
    import torch.distributed as dist

    from flexdilated.distributed import sequence_parallel_attention

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        spec = DilatedSpec(*W1, causal=True)
        q, k, v = (torch.randn(1, 8, 16384, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        torch.testing.assert_close(sequence_parallel_attention(q, k, v, spec), dilated_attention(q, k, v, spec))
    finally:
        dist.destroy_process_group()


def test_compiles_once_per_kind_of_change_across_batch_length_and_grad():
    """The strided route's graph on (B, N, H, D) views (what modules pass): changing the batch size, N (among
    multiples of W) or the grad mode compiles at most once per kind of change (the batch, folded into flex's batch
    of segments, and the chunk count are dynamic sizes). In (B, H, N, D) storage the batch folds into flex's heads,
    which flex keeps static: one graph per batch size (`test_compile_models.py` counts both on CPU)."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    spec = DilatedSpec(*W1, causal=True)

    def graphs_after(B, N, grad):
        q, k, v = (torch.randn(B, N, 8, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(grad)
                   for _ in range(3))
        out = dilated_attention(q, k, v, spec)
        if grad:
            out.sum().backward()
        return counters["stats"]["unique_graphs"]

    first = graphs_after(2, 16384, True)
    assert graphs_after(2, 16384, True) == first  # the same call: nothing new
    after_batch = graphs_after(3, 16384, True)  # a new batch size: at most one recompile
    assert after_batch - first <= 1
    after_length = graphs_after(3, 32768, True)  # a new length: at most one more
    assert after_length - after_batch <= 1
    assert graphs_after(5, 24576, True) == after_length  # batch and length both seen changing: dynamic
    after_grad = graphs_after(4, 24576, False)  # inference: at most one more
    assert after_grad - after_length <= 1
    assert graphs_after(7, 40960, False) == after_grad


@torch._dynamo.config.patch(recompile_limit=2)  # (pytest's monkeypatch would delete the config entry on undo)
def test_past_the_recompile_limit_results_stay_exact():
    """More distinct configurations than Dynamo keeps compiled versions (limit lowered to 2 here, 8 by default):
    no FailOnRecompileLimitHit reaches the caller, and every result still equals the reference."""
    specs = [
        DilatedSpec((512, 1024), (1, 2), causal=causal, overlap=overlap)
        for causal in (False, True) for overlap in ("multiset", "set")
    ] + [DilatedSpec((1024, 2048), (2, 4))]
    for spec in specs + specs[:2]:
        q, k, v = (torch.randn(1, 4, 4096, 64, device="cuda", dtype=torch.float32) for _ in range(3))
        with torch.no_grad():
            out, lse = dilated_attention(q, k, v, spec, return_lse=True)
            ref, ref_lse = reference_slabbed(q, k, v, spec, slab=1024)
        assert rel(out, ref) < TOLERANCE[torch.float32], spec
