"""Sequence parallelism on CPU with gloo, in spawned 2- and 4-process groups: every rank's shard of the output, LSE
and gradients equals the single-process result (float64), for segments shorter than, equal to and longer than a
shard, causal or not, both overlaps, GQA, grouped heads, both algorithms, DTensor inputs; bytes counted where sent;
mismatched or misaligned shards fail with a clear error on every rank. Every collective has a 60 s timeout and the
parent kills the group at its deadline: nothing can hang CI."""

import datetime
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flexdilated import DilatedSpec, dilated_attention

DEADLINE_S = 300

# (segment_lengths, dilation_rates, extra spec args, kv heads): with n = 16 tokens per rank
CASES = [
    ((8, 16, 32), (1, 2, 4), {}, 4),  # shorter than, equal to and longer than a shard (world 2: spans 2 ranks)
    ((8, 16, 32), (1, 2, 4), dict(causal=True), 2),  # GQA
    ((8, 64), (2, 3), dict(overlap="set"), 4),  # r = 3 does not divide n: padded rows
    ((8, 64), (2, 3), dict(overlap="set", causal=True), 2),
    ((16, 32, 10**9), (1, 2, 5), dict(heads="grouped"), 4),  # a whole-sequence segment, w % r != 0
    ((4, 64), (1, 4), dict(heads="grouped", causal=True, overlap="set"), 2),
]


def _run_cases(rank: int, world: int, algorithm: str) -> None:
    from flexdilated.distributed import count_bytes, sequence_parallel_attention

    n, B, H, D = 16, 2, 4, 8
    N = n * world
    mine = slice(rank * n, rank * n + n)
    for segments, rates, extra, Hkv in CASES:
        spec = DilatedSpec(segments, rates, **extra)
        gen = torch.Generator().manual_seed(hash((segments, rates)) % 2**31)
        q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64) for _ in range(2))
        dout = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref, ref_lse = dilated_attention(*full, spec, return_lse=True)
        (ref * dout).sum().backward()

        local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
        with count_bytes() as sent:
            out, lse = sequence_parallel_attention(*local, spec, return_lse=True, algorithm=algorithm)
            (out * dout[:, :, mine]).sum().backward()
        where = f"rank {rank}/{world} {algorithm} {spec}"
        exact = dict(rtol=1e-10, atol=1e-10)  # float64 throughout: no float32 step anywhere
        torch.testing.assert_close(out, ref[:, :, mine], **exact, msg=lambda m: f"{where}: out {m}")
        torch.testing.assert_close(lse, ref_lse[:, :, mine], msg=lambda m: f"{where}: lse {m}")
        for name, a, b in zip("qkv", local, full):
            torch.testing.assert_close(a.grad, b.grad[:, :, mine], **exact, msg=lambda m: f"{where}: d{name} {m}")
        expected = B * _expected_bytes(spec, H, Hkv, n, N, D)
        assert sent["forward"] == expected, (where, sent, expected)
        assert (sent["backward"] > 0) == (expected > 0), (where, sent)


def _expected_bytes(spec: DilatedSpec, H: int, Hkv: int, n: int, N: int, D: int) -> int:
    """Per rank and batch entry, forward: for each spanning pattern, (g - 1) shards of 2 (k and v) x classes x
    ceil(n / r) rows x D float64s."""
    from flexdilated.spec import branches

    total = 0
    for b in branches(DilatedSpec(tuple(min(w, N) for w in spec.segment_lengths), spec.dilation_rates,
                                  heads=spec.heads), H):
        if n % b.segment:
            classes = len({(h // (H // Hkv), o) for h, o in zip(b.heads, b.offsets)})
            total += 2 * (b.segment // n - 1) * classes * -(-n // b.rate) * D * 8
    return total


def _errors(rank: int, world: int) -> None:
    from flexdilated.distributed import sequence_parallel_attention

    spec = DilatedSpec((8, 32), (1, 2))
    n = 16 if rank == 0 else 8  # shards of different lengths: every rank must raise, none may hang
    x = torch.randn(1, 2, n, 8)
    with_message = "every rank must pass shards of the same shape"
    try:
        sequence_parallel_attention(x, x, x, spec)
    except ValueError as e:
        assert with_message in str(e), e
    else:
        raise AssertionError("mismatched shards did not raise")
    x = torch.randn(1, 2, 16, 8)
    try:
        sequence_parallel_attention(x, x, x, DilatedSpec((8, 24), (1, 2)))
    except ValueError as e:
        assert "segment length 24 does not fit the shards" in str(e) and "n = 16" in str(e), e
    else:
        raise AssertionError("a misaligned segment did not raise")


def _dtensor(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    spec = DilatedSpec((8, 16, 64), (1, 2, 4), causal=True)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 16 * world, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = dilated_attention(*full, spec)
    ref.square().sum().backward()
    for algorithm in ("all_gather", "ring"):
        dq, dk, dv = (distribute_tensor(x, mesh, [Shard(2)]).requires_grad_() for x in (q, k, v))
        out = dilated_attention(dq, dk, dv, spec, sequence_parallel=algorithm)
        assert out.placements == (Shard(2),), out.placements
        torch.testing.assert_close(out.full_tensor(), ref.detach())
        out.square().sum().backward()
        for a, b in zip((dq, dk, dv), full):
            torch.testing.assert_close(a.grad.full_tensor(), b.grad)


def _lm(rank: int, world: int, compiled: bool) -> None:
    """A sequence-parallel LongNetLM training step equals the single-process one: loss and summed gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flexdilated import LongNetLM

    torch.manual_seed(0)
    model = LongNetLM(50, 32, 2, 4, (8, 16, 64), (1, 2, 4), num_kv_heads=2).double()
    tokens = torch.randint(0, 50, (2, 16 * world + 1), generator=torch.Generator().manual_seed(1))
    ref = model.loss(tokens)
    ref.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    mesh = init_device_mesh("cpu", (world,))
    inputs, targets = (distribute_tensor(x, mesh, [Shard(1)]) for x in (tokens[:, :-1], tokens[:, 1:]))
    run = torch.compile(model.loss, fullgraph=True, backend="aot_eager") if compiled else model.loss
    loss = run(inputs, targets)
    torch.testing.assert_close(loss.full_tensor(), ref.detach())
    loss.to_local().backward()
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, expected[name], msg=lambda m: f"rank {rank} {name}: {m}")


def _worker(rank: int, world: int, init_file: str, jobs: list[str]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for job in jobs:
            if job in ("all_gather", "ring"):
                _run_cases(rank, world, job)
            elif job == "errors":
                _errors(rank, world)
            elif job == "dtensor":
                _dtensor(rank, world)
            elif job in ("lm", "lm compiled"):
                _lm(rank, world, job == "lm compiled")
            elif job == "die on rank 1":
                if rank == 1:
                    raise RuntimeError("rank 1 died")
                dist.barrier()  # waits for a rank that is gone
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # a failing rank dies at once; the others then fail their collectives within the timeout
    dist.destroy_process_group()
    os._exit(0)  # SPEC §3: gloo ranks sometimes abort at exit after success; leave without running atexit


def spawn(world: int, jobs: list[str]) -> None:
    """Run ``_worker`` on ``world`` processes; fail if any rank fails or the group outlives DEADLINE_S."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker, args=(world, os.path.join(tmp, "init"), jobs), nprocs=world, join=False, start_method="spawn"
        )
        end = time.monotonic() + DEADLINE_S
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > end:
                    raise AssertionError(f"the {world}-process group did not finish in {DEADLINE_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


def test_two_ranks_match_one_process():
    spawn(2, ["all_gather", "ring", "errors", "dtensor", "lm", "lm compiled"])


def test_four_ranks_match_one_process():
    spawn(4, ["all_gather", "ring"])


def test_a_dead_rank_fails_the_test_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(Exception):
        spawn(2, ["die on rank 1"])
    assert time.monotonic() - start < DEADLINE_S
