"""Bytes one rank sends per layer, counted (`count_bytes`), as N grows at a fixed spec and world size.

    torchrun --nproc-per-node 2 perf/dist_bytes.py        # CPU (gloo), ~1 min; also --nproc-per-node 4
    torchrun --nproc-per-node 4 perf/dist_bytes.py --lengths 8192,32768,131072

One forward + backward of `sequence_parallel_attention` per (spec, N, algorithm) on small random shards (B 1, H 4,
D 16, float32: 4 head classes per pattern). Specs:
- fixed:  w = (512, 2048, 8192), r = (1, 4, 16): segments fixed, longer than a shard at the small N;
- global: fixed + LongNet's whole-sequence pattern (N, N / 1024): 1,024 keys per head class whatever N.
Prints one row per run (rank 0) and appends the records to --out (JSON) if given.
"""

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from flexdilated import DilatedSpec  # noqa: E402
from flexdilated.distributed import count_bytes, sequence_parallel_attention  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
parser.add_argument("--out", default=None, help="a JSON file the records are appended to")
args = parser.parse_args()

cuda = torch.cuda.is_available()
local_rank = int(os.environ.get("LOCAL_RANK", 0))
if cuda:
    torch.cuda.set_device(local_rank)
dist.init_process_group("nccl" if cuda else "gloo")
P, rank = dist.get_world_size(), dist.get_rank()
device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
B, H, D = 1, 4, 16

records = []
if rank == 0:
    print(f"world size {P}; B {B}, H {H}, D {D}, float32 (4 bytes); bytes sent by one rank (the same on every rank)")
    print(f"{'spec':7s} {'N':>8s} {'n/rank':>7s} {'spanning patterns (w, r, g ranks)':36s} {'algorithm':10s} "
          f"{'fwd bytes':>10s} {'bwd bytes':>10s}")
for N in map(int, args.lengths.split(",")):
    n = N // P
    for name in ("fixed", "global"):
        segments, rates = (512, 2048, 8192), (1, 4, 16)
        if name == "global":
            segments, rates = segments + (N,), rates + (N // 1024,)
        spec = DilatedSpec(segments, rates)
        spanning = [(min(w, N), r, min(w, N) // n) for w, r in spec.patterns if n % min(w, N)]
        for algorithm in ("all_gather", "ring"):
            q, k, v = (torch.randn(B, H, n, D, device=device, requires_grad=True) for _ in range(3))
            with count_bytes() as sent:
                sequence_parallel_attention(q, k, v, spec, algorithm=algorithm).sum().backward()
            rec = dict(spec=name, patterns=str(spec.patterns), world_size=P, N=N, tokens_per_rank=n, B=B, H=H, D=D,
                       dtype="float32", algorithm=algorithm, spanning=str(spanning),
                       bytes_sent_fwd=sent["forward"], bytes_sent_bwd=sent["backward"])
            records.append(rec)
            if rank == 0:
                print(f"{name:7s} {N:>8,d} {n:>7,d} {str(spanning):36s} {algorithm:10s} {sent['forward']:>10,d} "
                      f"{sent['backward']:>10,d}", flush=True)
if rank == 0 and args.out:
    every = json.load(open(args.out)) if os.path.exists(args.out) else []
    with open(args.out, "w") as f:
        json.dump(every + records, f, indent=1)
dist.barrier()
dist.destroy_process_group()
