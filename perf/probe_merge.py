"""Variants of the strided route's merge and flex kernel options at one N (W1, bf16): forward time, peak memory,
and the kernel breakdown of the first variant. Probe switches live in `flexdilated.strided`.

    PYTHONPATH=$PWD python3 perf/probe_merge.py [N]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import flexdilated.strided as strided
from flexdilated import DilatedSpec, dilated_attention

from bench import flex, timed
from probe_core import peak_extra

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1048576
spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4))
q, k, v = (torch.randn(1, 8, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
qkvo = 4 * q.numel() * 2
core = [torch.randn(N // w, 8, w // r, 64, device="cuda", dtype=torch.bfloat16) for w, r in spec.patterns]
with torch.no_grad():
    t_core = timed(lambda: [flex(x, x, x) for x in core], reps=10)
    for x in core:
        print(f"dense core pattern {tuple(x.shape)}: {timed(lambda: flex(x, x, x), reps=10):.3f} ms")
del core
VARIANTS = {  # name: (PLACE_ALL, PRECOMPUTE_WEIGHTS, kernel_options, inductor options)
    "cat-place": (True, False, None, {}),
    "cat-place weights-out": (True, True, None, {}),
}
rows = []
ref = None
for name, (place_all, weights, kopts, options) in VARIANTS.items():
    torch._dynamo.reset()
    strided.PLACE_ALL, strided.PRECOMPUTE_WEIGHTS, strided.KERNEL_OPTIONS = place_all, weights, kopts
    strided._compiled = torch.compile(strided._strided_attention, fullgraph=True, options=options)
    try:
        with torch.no_grad():
            out = dilated_attention(q, k, v, spec)
            diff = 0.0 if ref is None else ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            ref = out if ref is None else ref
            del out
            ms = timed(lambda: dilated_attention(q, k, v, spec), reps=10)
            peak = peak_extra(lambda: dilated_attention(q, k, v, spec))
        rows.append((name, ms, ms / t_core, (peak + 3 * q.numel() * 2) / qkvo, diff))
    except Exception as e:  # a variant that does not compile is a result too
        rows.append((name, float("nan"), float("nan"), float("nan"), repr(e)[:200]))
    print(rows[-1], flush=True)
    if name in VARIANTS:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            dilated_attention(q, k, v, spec)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            dilated_attention(q, k, v, spec)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=90))
print(f"N={N} dense_core fwd {t_core:.2f} ms")
print(f"{'variant':30s} {'ms':>8s} {'/core':>6s} {'peak/qkvo':>9s} diff")
for r in rows:
    print(f"{r[0]:30s} {r[1]:8.2f} {r[2]:6.3f} {r[3]:9.3f} {r[4]}")
