"""The strided route compiled with static shapes, against the float64 reference (`perf/NOTES.md` attempt 20).

    PYTHONPATH=$PWD python3 perf/probe_static_dq.py [--kv-heads 8] [--length 16384] [--full] [--slices] [--no-div16]

Compiles the route as a user's own `torch.compile` would, with static shapes (its `maybe_mark_dynamic` marks
switched off), on B 1, H 8, W1, bf16, and prints the largest error of out, dq, dk and dv over the largest reference
value; the reference runs chunk by chunk of W (chunks are independent). ``--slices`` takes the classes' views as
strided slices again (the code before attempt 20); ``--no-div16`` also switches off Inductor's divisible-by-16
hints to Triton. H200, torch 2.11, triton 3.6 (the scripts this one combines): views as now 0.0054 for dq (as the
symbolic compile); ``--slices`` 0.3726 (with 8 kv heads dq 0.25, dk 0.31, dv 0.37); ``--slices --no-div16``
0.0054.
"""

import argparse
from unittest import mock

import torch

from flexdilated import DilatedSpec, dilated_attention, strided
from flexdilated.reference import reference_dilated_attention


def slices(x, dim, start, stop, step):
    return x[(slice(None),) * dim + (slice(start, stop, step),)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--full", action="store_true", help="not causal")
    p.add_argument("--slices", action="store_true", help="strided slices for the class views (before attempt 20)")
    p.add_argument("--no-div16", action="store_true", help="no divisible-by-16 hints to Triton")
    args = p.parse_args()
    if args.slices:
        strided._every = slices
    if args.no_div16:
        torch._inductor.config.triton.divisible_by_16 = False
    N, W = args.length, 8192
    spec = DilatedSpec((2048, 4096, W), (1, 2, 4), causal=not args.full)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, N, 64, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(1, args.kv_heads, N, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
    grad = torch.randn(1, 8, N, 64, device="cuda", generator=gen).bfloat16()

    ref = [[] for _ in range(4)]
    for c in range(N // W):
        xs = [x[:, :, c * W : (c + 1) * W].double().requires_grad_() for x in (q, k, v)]
        out = reference_dilated_attention(*xs, spec)
        for parts, t in zip(ref, (out, *torch.autograd.grad((out * grad[:, :, c * W : (c + 1) * W]).sum(), xs))):
            parts.append(t.detach())
    ref = [torch.cat(parts, 2) for parts in ref]

    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    with mock.patch.object(torch._dynamo, "maybe_mark_dynamic", lambda x, dim: None):
        out = dilated_attention(*xs, spec)
        got = (out, *torch.autograd.grad((out * grad).sum(), xs))
    errors = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)]
    print("static compile vs float64 reference, largest error / largest value: "
          + " | ".join(f"{n} {e:.4f}" for n, e in zip(("out", "dq", "dk", "dv"), errors)))


if __name__ == "__main__":
    main()
