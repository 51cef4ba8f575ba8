"""Sequence-parallel dilated attention: one sequence sharded over the ranks, checked against one process.

    torchrun --nproc-per-node 2 examples/distributed_attention.py                 # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 4 examples/distributed_attention.py --seq-len 2048
    torchrun --nproc-per-node 1 examples/distributed_attention.py                 # world size 1: all local
    torchrun --nproc-per-node 2 examples/distributed_attention.py --device cpu --dtype float64

Rank ρ of P holds tokens ρ·n .. ρ·n + n - 1 of q, k, v (n = N / P). The spec's segments are N/8, N/4, N/2 and N:
shorter than, equal to and longer than a shard at P = 2, 4, 8, so some patterns stay on their shard (local, no
communication) and some span g = w / n ranks (their sparsified keys and values travel). The script

1. runs `sequence_parallel_attention` forward and backward with both algorithms ("all_gather", "ring") and
   compares each rank's shard of the output and of dq, dk, dv with `dilated_attention` on the whole sequence
   (every rank computes that reference itself: the inputs come from one seed); prints the max errors, the bytes
   each rank sent (counted where sent) and the time;
2. trains a small `LongNetLM` a few AdamW steps with the sequence sharded (DTensor ``Shard(1)``), comparing
   loss and gradients at step 1, and the loss at every step, with the same model trained in one process.

Exits non-zero on any mismatch.
"""

import os

for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")  # NVLink multicast off

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless here
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from flexdilated import DilatedSpec, LongNetLM, dilated_attention  # noqa: E402
from flexdilated.distributed import count_bytes, sequence_parallel_attention  # noqa: E402

# ----------------------------------------------------------------------------------------------------- setup
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seq-len", type=int, default=1024, help="N, the whole sequence (divisible by 8 and by P)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--dtype", default=None, help="float64, float32, bfloat16 (default bf16 on CUDA, else fp32)")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--head-dim", type=int, default=32)
parser.add_argument("--lm-steps", type=int, default=3)
parser.add_argument("--backend", default=None, help="default nccl on CUDA, gloo on CPU (gloo on CUDA: ranks may share a GPU)")
args = parser.parse_args()

cuda = args.device.startswith("cuda")
local_rank = int(os.environ.get("LOCAL_RANK", 0))
gpu = local_rank % torch.cuda.device_count() if cuda else None
if cuda:
    torch.cuda.set_device(gpu)
dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{gpu}" if cuda else "cpu")
dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
# max |error| / max |reference| allowed: the two sides sum the same terms in a different order
tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}[dtype]

N, B, H, D = args.seq_len, args.batch, args.heads, args.head_dim
if N % 8 or N % world:
    sys.exit(f"--seq-len {N} must be divisible by 8 and by the world size {world}")
n = N // world
mine = slice(rank * n, rank * n + n)  # this rank's tokens


def say(*a):
    if rank == 0:
        print(*a, flush=True)


def sync():
    if cuda:
        torch.cuda.synchronize()


def everyone(values, op=dist.ReduceOp.MAX):
    """The same reduction of a few floats over every rank."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def per_rank(value):
    """``value`` (an int) of every rank, as a list."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    every = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(every, t)
    return [int(x) for x in every]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


failures = []

spec = DilatedSpec((N // 8, N // 4, N // 2, N), (1, 2, 4, 8))
say(f"world {world}, {device} ({'nccl' if cuda else 'gloo'}), {dtype}, B={B} H={H} D={D}, N={N:,}, n={n:,} per rank")
say(f"spec {spec}")
for w, r in spec.patterns:
    kind = "local (no communication)" if n % w == 0 else f"spanning {w // n} ranks (sparsified k, v exchanged)"
    say(f"  pattern (w={w:>6,}, r={r:>2}): {kind}")

# ------------------------------------------------------------------- 1. attention forward + backward vs one process
gen = torch.Generator().manual_seed(0)  # the same tensors on every rank
q, k, v, dout = (torch.randn(B, H, N, D, generator=gen).to(device, dtype) for _ in range(4))

full = [x.clone().requires_grad_() for x in (q, k, v)]
ref = dilated_attention(*full, spec)
ref.backward(dout)

for algorithm in ("all_gather", "ring"):
    shard = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
    sequence_parallel_attention(*shard, spec, algorithm=algorithm).backward(dout[:, :, mine])  # warm-up
    shard = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
    dist.barrier()
    sync()
    t0 = time.perf_counter()
    with count_bytes() as sent:
        out = sequence_parallel_attention(*shard, spec, algorithm=algorithm)
        sync()
        t1 = time.perf_counter()
        out.backward(dout[:, :, mine])
        sync()
    t2 = time.perf_counter()
    errs = [rel_err(out, ref[:, :, mine])] + [rel_err(a.grad, b.grad[:, :, mine]) for a, b in zip(shard, full)]
    errs = everyone(errs)  # worst over the ranks
    fwd_ms, bwd_ms = everyone([1e3 * (t1 - t0), 1e3 * (t2 - t1)])
    sent_fwd, sent_bwd = per_rank(sent["forward"]), per_rank(sent["backward"])
    say(f"\n{algorithm}: max error / max |ref| over ranks: out {errs[0]:.1e}, dq {errs[1]:.1e}, "
        f"dk {errs[2]:.1e}, dv {errs[3]:.1e} (tolerance {tol:.0e})")
    say(f"  time (slowest rank): forward {fwd_ms:.1f} ms, backward {bwd_ms:.1f} ms")
    for p in range(world):
        say(f"  rank {p}: sent {sent_fwd[p]:>9,} B forward, {sent_bwd[p]:>9,} B backward")
    if max(errs) > tol:
        failures.append(f"{algorithm}: errors {errs} above {tol}")

# ------------------------------------------------------------------ 2. LongNetLM training steps vs one process
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard  # noqa: E402

mesh = init_device_mesh(device.type, (world,))
torch.manual_seed(0)  # the same initial weights on every rank
model = LongNetLM(256, 64, 2, 4, spec.segment_lengths, spec.dilation_rates).to(device)
single = copy.deepcopy(model)  # the one-process reference, trained alongside on every rank
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
opt_single = torch.optim.AdamW(single.parameters(), lr=1e-3)
say(f"\nLongNetLM (vocab 256, dim 64, depth 2, heads 4, causal), {sum(p.numel() for p in model.parameters()):,} "
    f"parameters, AdamW, B={B}, N={N:,} sharded over {world} rank(s)")

for step in range(1, args.lm_steps + 1):
    tokens = torch.randint(0, 256, (B, N + 1), generator=gen).to(device)
    inputs, targets = (DTensor.from_local(x[:, mine], mesh, [Shard(1)], run_check=False)
                       for x in (tokens[:, :-1], tokens[:, 1:]))
    loss = model.loss(inputs, targets)  # a Partial DTensor: each rank holds its tokens' share of the mean
    loss.to_local().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)  # each rank's share of each gradient: sum them

    loss_single = single.loss(tokens[:, :-1], tokens[:, 1:])
    loss_single.backward()
    loss_value = loss.full_tensor().item()
    err = abs(loss_value - loss_single.item()) / abs(loss_single.item())
    if step == 1:
        err = max([err] + [rel_err(a.grad, b.grad) for a, b in zip(model.parameters(), single.parameters())])
    err = everyone([err])[0]
    say(f"  step {step}: loss {loss_value:.5f} (one process {loss_single.item():.5f}), max relative error "
        f"{err:.1e}{' incl. gradients' if step == 1 else ''}")
    if err > (1e-4 if device.type == "cpu" else 2e-3):  # CUDA: flex's float32 kernels may round differently
        failures.append(f"LongNetLM step {step}: error {err:.1e}")
    for o in (opt, opt_single):
        o.step()
        o.zero_grad()

# -------------------------------------------------------------------------------------------------------- done
failed = everyone([float(bool(failures))])[0]
if failures:
    print(f"rank {rank}: MISMATCH: " + "; ".join(failures), flush=True)
say("\nFAILED" if failed else "\nOK: every rank's shard matches the single-process result")
dist.destroy_process_group()
sys.exit(1 if failed else 0)
