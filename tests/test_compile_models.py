"""The models inside a user's ``torch.compile(model, fullgraph=True)`` on CPU ("aot_eager", which traces the
backward too): forward and backward with no graph break (fullgraph raises on one), equal to eager, no
recompilation across training steps (LongNetLM's is in test_models.py); how many compiles new lengths cost; the
strided route past Dynamo's recompile limit."""

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import flexdilated.strided as strided
from flexdilated import DilatedSpec, LongNet, LongNetEncoder, LongNetLM, dilated_attention, reference_dilated_attention
from test_strided import cuda_dispatch_eagerly

W = 16  # the largest segment


def lm_case(k: int, g: torch.Generator):
    tokens = torch.randint(0, 50, (2, k * W + 1), generator=g)
    return (tokens[:, :-1],), lambda out: F.cross_entropy(out.flatten(0, 1), tokens[:, 1:].flatten())


def encoder_case(k: int, g: torch.Generator):
    pad = torch.arange(k * W).expand(2, -1) >= torch.tensor([[k * W], [k * W - 5]])
    return (torch.randint(0, 50, (2, k * W), generator=g), pad), lambda out: out[~pad].square().mean()


def longnet_case(k: int, g: torch.Generator):
    src, tgt = torch.randint(0, 50, (2, k * W), generator=g), torch.randint(0, 60, (2, (k + 1) * W + 1), generator=g)
    pad = torch.arange(k * W).expand(2, -1) >= torch.tensor([[k * W], [k * W - 5]])
    return (src, tgt[:, :-1], pad), lambda out: F.cross_entropy(out.flatten(0, 1), tgt[:, 1:].flatten())


MODELS = {
    "LongNetLM": (lambda: LongNetLM(50, 16, 1, 2, (8, W), (1, 2)), lm_case),
    "LongNetEncoder": (lambda: LongNetEncoder(50, 16, 1, 2, (8, W), (1, 2)), encoder_case),
    "LongNet": (lambda: LongNet(50, 60, 16, 1, 1, 2, (8, W), (1, 2), num_kv_heads=1), longnet_case),
}


def train_compiled(name: str, lengths) -> list[int]:
    """One SGD step of the compiled model per length ``k * W``, checked against eager; the compile count after each."""
    make, case = MODELS[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    counter = CompileCounterWithBackend("aot_eager")  # counts this compile only (eager CPU flex traces its own)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    counts = []
    for k in lengths:
        args, loss_of = case(k, g)
        out = compiled(*args)
        torch.testing.assert_close(out, model(*args), rtol=1e-5, atol=1e-5)
        loss_of(out).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad()
        counts.append(counter.frame_count)
    return counts


@pytest.mark.parametrize("name", ["LongNetEncoder", "LongNet"])
def test_compiles_fullgraph_once_across_training_steps(name):
    assert train_compiled(name, (2, 2, 2)) == [1, 1, 1]


def test_compiles_once_per_sequence_length():
    # N = 2W compiles with static shapes; N = 3W recompiles once with N symbolic (torch's automatic dynamic shapes),
    # and no later multiple of W compiles again. (The CPU route's slab loop is written without a loop when one slab
    # covers the folded batch: a loop over a symbolic batch size would guard on its value, `kernels._slab_starts`.)
    # LongNetEncoder and LongNet (source and target lengths each symbolic) measured the same counts; they are left
    # out here for time (their dynamic recompiles take 6 and 12 s each on 2 cores).
    assert train_compiled("LongNetLM", (2, 3, 4, 6)) == [1, 2, 2, 2]


@contextmanager
def strided_graph_on_cpu():
    """CUDA's dispatch run on CPU (`test_strided.cuda_dispatch_eagerly`), the strided route's graph traced by Dynamo
    only (the "eager" backend): what is counted is Dynamo's graphs and recompiles."""
    compiled = torch.compile(strided._strided_attention, fullgraph=True, backend="eager")
    with cuda_dispatch_eagerly(), mock.patch.object(strided, "_compiled", compiled), torch.no_grad():
        yield


@pytest.mark.parametrize("layout, graphs", [("bnhd", 3), ("bhnd", 5)])
def test_strided_route_compiles_across_batch_and_length(layout, graphs):
    """The strided route's compiled graph: the first compile is static; the first change of the batch size and of
    N each compiles once more, with that size symbolic. (B, N, H, D) views fold the batch into flex's batch of
    segments, so then one graph serves every batch size > 1 and every N: 3 graphs. In (B, H, N, D) storage the
    batch folds into flex's heads, which flex keeps static: one graph per batch size (4 of them) and one for the
    new N: 5."""
    spec = DilatedSpec((128, 256, 512), (1, 2, 4), causal=True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with strided_graph_on_cpu():
        for B, chunks in ((2, 2), (2, 2), (3, 2), (3, 4), (5, 3), (4, 3)):
            shape = (B, 512 * chunks, 8, 16) if layout == "bnhd" else (B, 8, 512 * chunks, 16)
            q, k, v = (torch.randn(shape).transpose(1, 2) if layout == "bnhd" else torch.randn(shape) for _ in range(3))
            dilated_attention(q, k, v, spec)
    assert counters["stats"]["unique_graphs"] == graphs


def test_strided_route_past_the_recompile_limit_stays_exact():
    """More distinct configurations than Dynamo keeps compiled versions (limit lowered to 1 here, 8 by default):
    the route drops its versions and compiles afresh — no FailOnRecompileLimitHit reaches the caller, every result
    equals the reference, and the drop did happen."""
    torch._dynamo.reset()
    drop = torch._dynamo.eval_frame.remove_from_cache
    specs = [DilatedSpec((128, 256), (1, 2), causal=True), DilatedSpec((128, 256), (1, 2), overlap="set"),
             DilatedSpec((64, 256), (2, 4))]
    g = torch.Generator().manual_seed(0)
    with strided_graph_on_cpu(), \
            mock.patch.object(torch._dynamo.eval_frame, "remove_from_cache", wraps=drop) as dropped, \
            torch._dynamo.config.patch(recompile_limit=1):  # (pytest's monkeypatch would delete the entry on undo)
        for spec in specs + specs[:1]:
            q, k, v = (torch.randn(1, 4, 512, 16, generator=g, dtype=torch.float64) for _ in range(3))
            out = dilated_attention(q, k, v, spec)
            torch.testing.assert_close(out, reference_dilated_attention(q, k, v, spec), rtol=1e-10, atol=1e-10)
    assert dropped.call_count >= 2  # every new spec past the first hit the limit
