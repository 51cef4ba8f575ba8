"""The strided route (`flexdilated/strided.py`) on W1 against the dense core and the gather route it replaces:
time (fwd, fwd+bwd), first-call time, peak memory, compile count across N, and the bf16 difference between the
two routes. CUDA events, 2 warm-ups, median of 10; fresh random inputs.

    PYTHONPATH=$PWD python3 perf/probe_strided.py [--out DIR] [--lengths 65536,262144,1048576]
"""

import argparse
import json
import time

import torch
from torch._dynamo.utils import counters

import flexdilated.attention as attention
from flexdilated import DilatedSpec, dilated_attention

from bench import flex, timed
from probe_core import peak_extra

W1 = ((2048, 4096, 8192), (1, 2, 4))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--lengths", default="65536,262144,1048576")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--overlap", default="multiset")
    parser.add_argument("--heads", default="all")
    parser.add_argument("--bwd-max", type=int, default=1048576)
    args = parser.parse_args()
    spec = DilatedSpec(*W1, causal=args.causal, overlap=args.overlap, heads=args.heads)
    rows = []
    for N in map(int, args.lengths.split(",")):
        q, k, v = (torch.randn(1, 8, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qkvo = 4 * q.numel() * q.element_size()
        core = [torch.randn(N // w, 8 if args.heads == "all" else 8 // 3 + 1, w // r, 64, device="cuda",
                            dtype=torch.bfloat16) for w, r in spec.patterns]
        with torch.no_grad():
            t_core = timed(lambda: [flex(x, x, x) for x in core], reps=10)
        rows.append(dict(impl="dense_core", N=N, mode="fwd", ms=t_core))
        grads = [x.clone().requires_grad_() for x in core]
        t_core_b = timed(lambda: [flex(x, x, x).backward(torch.ones_like(x)) for x in grads], reps=10)
        rows.append(dict(impl="dense_core", N=N, mode="fwd+bwd", ms=t_core_b))
        with torch.no_grad():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dilated_attention(q, k, v, spec)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = timed(lambda: dilated_attention(q, k, v, spec), reps=10)
            peak = peak_extra(lambda: dilated_attention(q, k, v, spec))
        rows.append(dict(impl="strided", N=N, mode="fwd", ms=ms, vs_core=ms / t_core, first_call_s=first,
                         peak_over_qkvo=(peak + 3 * q.numel() * 2) / qkvo, graphs=counters["stats"]["unique_graphs"]))
        print(rows[-1], flush=True)
        if N <= args.bwd_max:
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            go = torch.randn_like(q)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dilated_attention(*xs, spec).backward(go)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = timed(lambda: dilated_attention(*xs, spec).backward(go), reps=10)
            rows.append(dict(impl="strided", N=N, mode="fwd+bwd", ms=ms, vs_core=ms / t_core_b, first_call_s=first,
                             graphs=counters["stats"]["unique_graphs"]))
            print(rows[-1], flush=True)
            del xs
        if N == 65536:  # the gather route on the same inputs: time and agreement
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            out = dilated_attention(*xs, spec)
            g_new = torch.autograd.grad((out.float() * go.float()).sum(), xs)
            saved = attention.strided_classes
            attention.strided_classes = lambda *a: None
            ref = dilated_attention(*xs, spec)
            g_ref = torch.autograd.grad((ref.float() * go.float()).sum(), xs)
            with torch.no_grad():
                ms = timed(lambda: dilated_attention(q, k, v, spec), reps=10)
            attention.strided_classes = saved
            rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
            rows.append(dict(impl="gather", N=N, mode="fwd", ms=ms, vs_core=ms / t_core,
                             diff=[rel(out, ref)] + [rel(a, b) for a, b in zip(g_new, g_ref)]))
            print(rows[-1], flush=True)
            del xs, out, ref, g_new, g_ref
        del q, k, v, core, grads
        torch.cuda.empty_cache()
    if args.out:
        with open(f"{args.out}/probe_strided.json", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, spec=str(spec), rows=rows),
                      f, indent=1)
    print(spec)
    print(f"{'impl':12s} {'N':>9s} {'mode':8s} {'ms':>9s} {'/core':>7s} {'peak/qkvo':>9s} {'first s':>8s} graphs diff")
    for r in rows:
        print(f"{r['impl']:12s} {r['N']:>9,d} {r['mode']:8s} {r['ms']:9.2f} {r.get('vs_core', float('nan')):7.2f} "
              f"{r.get('peak_over_qkvo', float('nan')):9.2f} {r.get('first_call_s', float('nan')):8.1f} "
              f"{r.get('graphs', '')} {r.get('diff', '')}")


if __name__ == "__main__":
    main()
