"""Positions, decoding and LongNetLM: the KV cache gives the logits of a full forward; training works."""

import math

import pytest
import torch

from flexdilated import DilatedSpec, LongNetLM, RotaryEmbedding, dilated_attention, dilated_attention_step


@pytest.mark.parametrize("xpos", [False, True])
def test_rotary_scores_depend_on_relative_position_only(xpos):
    rot = RotaryEmbedding(8, xpos=xpos)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    scores = []
    for p, t in ((5, 2), (105, 102), (1005, 1002)):
        qp, _ = rot(q, q, offset=p)
        _, kt = rot(k, k, offset=t)
        scores.append((qp * kt).sum().item())
    assert scores[0] == pytest.approx(scores[1], rel=1e-9) and scores[0] == pytest.approx(scores[2], rel=1e-9)
    # offsets are absolute positions: a block of 6 tokens equals its tokens one by one
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    whole, _ = rot(x, x, offset=10)
    parts = torch.cat([rot(x[:, :, i : i + 1], x[:, :, i : i + 1], offset=10 + i)[0] for i in range(6)], dim=2)
    torch.testing.assert_close(whole, parts)


def test_rotary_without_xpos_keeps_norms():
    rot = RotaryEmbedding(16)
    x = torch.randn(2, 3, 50, 16)
    q, _ = rot(x, x, offset=7)
    torch.testing.assert_close(q.norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match="head_dim must be a positive even int"):
        RotaryEmbedding(7)


def test_attention_step_is_the_last_row():
    spec = DilatedSpec((8, 16, 24), (1, 2, 3), causal=True, overlap="set")
    q = torch.randn(2, 6, 53, 4, dtype=torch.float64)
    k, v = torch.randn(2, 3, 53, 4, dtype=torch.float64), torch.randn(2, 3, 53, 4, dtype=torch.float64)
    full = dilated_attention(q, k, v, spec)
    for p in (0, 7, 8, 23, 24, 52):
        step = dilated_attention_step(q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], spec)
        torch.testing.assert_close(step, full[:, :, p : p + 1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="spec.causal must be True"):
        dilated_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], DilatedSpec((8,), (1,)))
    # left padding: row b begins at starts[b] (keys before it are no keys), as if alone
    starts = torch.tensor([0, 29])
    for p in (29, 30, 37, 52):
        step = dilated_attention_step(q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], spec, starts=starts)
        for b, s in enumerate(starts.tolist()):
            alone = dilated_attention(*(x[b : b + 1, :, s : p + 1] for x in (q, k, v)), spec)[:, :, -1:]
            torch.testing.assert_close(step[b : b + 1], alone, rtol=1e-12, atol=1e-12)


def small_lm(**kwargs):
    torch.manual_seed(0)
    return LongNetLM(50, 32, 2, 4, (8, 16), (1, 2), **kwargs).double()


@pytest.mark.parametrize("position", ["xpos", "rope", None])
def test_kv_cache_logits_equal_full_forward(position):
    lm = small_lm(position=position, num_kv_heads=2).eval()
    tokens = torch.randint(0, 50, (2, 37))
    full = lm(tokens)
    caches = [{} for _ in lm.blocks]
    steps = [lm.step(tokens[:, :20], caches)]  # the prompt in one go, then token by token
    steps += [lm.step(tokens[:, p : p + 1], caches) for p in range(20, 37)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


def test_generate_greedy_matches_argmax_of_full_forward():
    lm = small_lm().eval()
    prompt = torch.randint(0, 50, (1, 12))
    out = lm.generate(prompt, 10, temperature=0)
    assert torch.equal(out[:, :12], prompt) and out.shape == (1, 22)
    for p in range(12, 22):
        assert out[0, p] == lm(out[:, :p])[0, -1].argmax()


@pytest.mark.parametrize("position", ["xpos", "rope", None])
def test_left_padded_prompts_decode_as_if_alone(position):
    """Prompts of lengths 21, 9 and 1 in one batch, left-padded with random tokens: each row's logits, prompt and
    steps, equal a full forward of that row alone, across segment boundaries (w = 8, 16); greedy generation gives
    each row what it gives alone."""
    lm = small_lm(position=position, num_kv_heads=2).eval()
    gen = torch.Generator().manual_seed(1)
    lengths, P, new = (21, 9, 1), 21, 14
    tokens = torch.randint(0, 50, (3, P + new), generator=gen)  # the padding's tokens are random too
    pad = torch.arange(P) < torch.tensor([P - n for n in lengths])[:, None]
    caches = [{"starts": pad.sum(1)} for _ in lm.blocks]
    steps = torch.cat([lm.step(tokens[:, :P], caches)] + [lm.step(tokens[:, p : p + 1], caches) for p in range(P, P + new)], 1)
    for b, n in enumerate(lengths):
        alone = lm(tokens[b : b + 1, P - n :])[0]
        torch.testing.assert_close(steps[b, P - n :], alone, rtol=1e-9, atol=1e-9)
    out = lm.generate(tokens[:, :P], 8, prompt_padding_mask=pad, temperature=0)
    for b, n in enumerate(lengths):
        assert torch.equal(out[b, P - n :], lm.generate(tokens[b : b + 1, P - n : P], 8, temperature=0)[0])


def test_generate_eos_and_bad_arguments():
    lm = small_lm().eval()
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    free = lm.generate(prompt, 6, temperature=0)
    eos = free[0, 6].item()  # row 0's second new token: it stops there
    out = lm.generate(prompt, 6, temperature=0, eos_token=eos)
    first = [(row[5:] == eos).nonzero()[0].item() for row in out]  # every row produced it (else it would not stop)
    for row, f, free_row in zip(out, first, free):
        assert torch.equal(row[: 5 + f + 1], free_row[: 5 + f + 1]) and (row[5 + f :] == eos).all()
    assert out.shape[1] == 5 + max(first) + 1 <= free.shape[1]
    with pytest.raises(ValueError, match="prompt_padding_mask must mark left padding"):
        lm.generate(prompt, 2, prompt_padding_mask=torch.tensor([[False, True] + [False] * 3] * 2))
    with pytest.raises(ValueError, match="leaves a row without a real token"):
        lm.generate(prompt, 2, prompt_padding_mask=torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match=r"prompt_padding_mask must be a bool tensor shaped like its tokens \(2, 5\)"):
        lm.generate(prompt, 2, prompt_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="prompt must hold at least one token"):
        lm.generate(prompt[:, :0], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        lm.generate(prompt, -1)


def test_training_lowers_the_loss_and_checkpointing_gives_the_same_gradients():
    lm = small_lm(dropout=0.0)
    tokens = torch.arange(40).remainder(7)[None].repeat(2, 1)  # a periodic sequence: learnable
    loss0 = lm.loss(tokens)
    grads = torch.autograd.grad(loss0, list(lm.parameters()))
    lm.checkpointing = True
    grads_ckpt = torch.autograd.grad(lm.loss(tokens), list(lm.parameters()))
    for g, h in zip(grads, grads_ckpt):
        torch.testing.assert_close(g, h)
    assert loss0.item() == pytest.approx(math.log(50), rel=0.2)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        lm.loss(tokens).backward()
        opt.step()
    assert lm.loss(tokens).item() < 0.5 * loss0.item()


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="position must be"):
        LongNetLM(10, 16, 1, 2, (8,), (1,), position="alibi")
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        LongNetLM(10, 30, 1, 4, (8,), (1,))
    with pytest.raises(ValueError, match="tokens must be an int tensor"):
        LongNetLM(10, 16, 1, 2, (8,), (1,))(torch.randn(1, 4))


def test_lm_compiles_fullgraph_without_recompiling_across_steps():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # counts this compile only (eager CPU flex traces its own)
    lm = LongNetLM(50, 32, 2, 4, (8, 16), (1, 2))
    compiled = torch.compile(lm, fullgraph=True, backend=counter)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    for step in range(3):
        tokens = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(step))
        logits = compiled(tokens[:, :-1])
        torch.testing.assert_close(logits, lm(tokens[:, :-1]), rtol=1e-5, atol=1e-5)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    assert counter.frame_count == 1
