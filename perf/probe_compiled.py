"""Does compiling the whole slab (gathers, flex calls, LSE merge) with Inductor pay? W1, bf16, CUDA events,
median of 10, beside the dense core. Prints first-call time (compile) too.

    PYTHONPATH=$PWD python3 perf/probe_compiled.py
"""

import time

import torch

import flexdilated.attention as attention
from flexdilated import DilatedSpec, dilated_attention

from probe_core import SPEC, flex, peak_extra, timed

eager = attention._attention
compiled = torch.compile(eager, fullgraph=True, dynamic=False)
for N in (65536, 262144, 1048576):
    q, k, v = (torch.randn(1, 8, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    core = [torch.randn(N // w, 8, w // r, 64, device="cuda", dtype=torch.bfloat16) for w, r in SPEC.patterns]
    with torch.no_grad():
        t_core = timed(lambda: [flex(x, x, x) for x in core])
    for name, fn in (("eager", eager), ("compiled", compiled)):
        attention._attention = fn
        with torch.no_grad():
            t0 = time.perf_counter()
            dilated_attention(q, k, v, SPEC)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = timed(lambda: dilated_attention(q, k, v, SPEC))
            peak = (peak_extra(lambda: dilated_attention(q, k, v, SPEC)) + 3 * q.nbytes) / (4 * q.nbytes)
        line = f"{name:9s} N={N:>9,} fwd {ms:8.2f} ms  /core {ms / t_core:5.2f}  peak/qkvo {peak:5.2f}  first call {first:6.1f} s"
        if N <= 262144:
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            t0 = time.perf_counter()
            dilated_attention(*xs, SPEC).backward(torch.ones_like(q))
            first = time.perf_counter() - t0
            fb = timed(lambda: dilated_attention(*xs, SPEC).backward(torch.ones_like(q)), reps=5)
            line += f"  fwd+bwd {fb:8.2f} ms (first {first:5.1f} s)"
        print(line, flush=True)
    del q, k, v, core
    torch.cuda.empty_cache()
