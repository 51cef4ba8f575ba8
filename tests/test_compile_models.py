"""The models inside a user's ``torch.compile(model, fullgraph=True)`` on CPU ("aot_eager", which traces the
backward too): forward and backward with no graph break (fullgraph raises on one), equal to eager, no
recompilation across training steps (LongNetLM's is in test_models.py); how many compiles new lengths cost."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from flexdilated import LongNet, LongNetEncoder, LongNetLM

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
