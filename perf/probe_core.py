"""Time and peak memory of `dilated_attention` on W1 (B=1, H=8, D=64, bf16, w=(2048, 4096, 8192), r=(1, 2, 4))
for a few N and slab sizes, beside the dense core (compiled flex, no mask, on tensors shaped like the gathered
sub-sequences: the same useful work). CUDA events, 2 warm-ups, median of 10; fresh random inputs.

    PYTHONPATH=$PWD python3 perf/probe_core.py [--out DIR]
"""

import argparse
import json

import torch

import flexdilated.attention as attention
from flexdilated import DilatedSpec, dilated_attention

from bench import flex, timed  # noqa: F401 (probe_compiled imports them from here)

SPEC = DilatedSpec((2048, 4096, 8192), (1, 2, 4))


def peak_extra(fn):
    """Peak bytes allocated during fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--lengths", default="65536,262144,1048576")
    args = parser.parse_args()
    rows = []
    for N in map(int, args.lengths.split(",")):
        q, k, v = (torch.randn(1, 8, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qkvo = 4 * q.numel() * q.element_size()
        core = [
            torch.randn(N // w, 8, w // r, 64, device="cuda", dtype=torch.bfloat16) for w, r in SPEC.patterns
        ]
        with torch.no_grad():
            t_core = timed(lambda: [flex(x, x, x) for x in core])
        rows.append(dict(impl="dense_core", N=N, mode="fwd", ms=t_core))
        for slab in (2**24, 2**26, 2**62):
            attention.SLAB_ELEMENTS = slab
            with torch.no_grad():
                ms = timed(lambda: dilated_attention(q, k, v, SPEC))
                peak = peak_extra(lambda: dilated_attention(q, k, v, SPEC))
            rows.append(dict(impl=f"flexdilated slab=2^{slab.bit_length() - 1}", N=N, mode="fwd", ms=ms,
                             peak_over_qkvo=(peak + 3 * q.numel() * 2) / qkvo, vs_core=ms / t_core))
            if slab == 2**62 and N <= 262144:
                xs = [x.clone().requires_grad_() for x in (q, k, v)]
                ms = timed(lambda: dilated_attention(*xs, SPEC).backward(torch.ones_like(q)), reps=5)
                rows.append(dict(impl=f"flexdilated slab=2^{slab.bit_length() - 1}", N=N, mode="fwd+bwd", ms=ms))
            print(rows[-1], flush=True)
        del q, k, v, core
        torch.cuda.empty_cache()
    if args.out:
        with open(f"{args.out}/probe_core.json", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    print(f"{'impl':28s} {'N':>9s} {'mode':8s} {'ms':>9s} {'/core':>7s} {'peak/qkvo':>9s}")
    for r in rows:
        print(f"{r['impl']:28s} {r['N']:>9,d} {r['mode']:8s} {r['ms']:9.2f} {r.get('vs_core', float('nan')):7.2f} "
              f"{r.get('peak_over_qkvo', float('nan')):9.2f}")


if __name__ == "__main__":
    main()
