"""The longest N on one GPU (W1, H=8, D=64, bf16): forward and forward+backward through the strided route (one
flex call per head past 2**31 elements), checking rows near the end against the float64 reference (large offsets
are where int32 index arithmetic would overflow).

    PYTHONPATH=$PWD python3 perf/probe_long.py [--lengths 4194304,8388608] [--modes fwd,fwd+bwd]
"""

import argparse
import time

import torch

import flexdilated.strided as strided
from flexdilated import DilatedSpec, dilated_attention
from flexdilated.reference import reference_rows

spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4))
parser = argparse.ArgumentParser()
parser.add_argument("--lengths", default="4194304,8388608")
parser.add_argument("--modes", default="fwd,fwd+bwd")
parser.add_argument("--slab", type=int, default=None, help="strided.SLAB_ELEMENTS for inference")
args = parser.parse_args()
if args.slab:
    strided.SLAB_ELEMENTS = args.slab
rows = []
for N in map(int, args.lengths.split(",")):
    for mode in args.modes.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            q, k, v = (torch.randn(1, 8, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            if mode == "fwd+bwd":
                q, k, v = (x.requires_grad_() for x in (q, k, v))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.set_grad_enabled(mode == "fwd+bwd"):
                out = dilated_attention(q, k, v, spec)
                if mode == "fwd+bwd":
                    out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            last = torch.arange(N - 300, N, 7, device="cuda")
            window = torch.arange(N - 8192, N, device="cuda")  # the last chunk holds every key of these rows
            ref, _ = reference_rows(q.detach()[:, :, last].double(), k.detach()[:, :, window].double(),
                                    v.detach()[:, :, window].double(), spec, last, key_positions=window)
            err = ((out.detach()[:, :, last].double() - ref).norm() / ref.norm()).item()
            rows.append((N, mode, f"{secs:.2f} s", f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", f"rel err last rows {err:.2e}"))
            del q, k, v, out
        except Exception as e:  # OOM or a kernel failure is the result
            rows.append((N, mode, "failed", repr(e)[:160]))
            q = k = v = out = None
        print(rows[-1], flush=True)
for r in rows:
    print(*r)
