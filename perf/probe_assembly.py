"""How fast can the gradients of q be assembled from the classes' gradients? (B 8, W1, H 8, D 64, bf16)

    PYTHONPATH=$PWD python3 perf/probe_assembly.py

The backward of the strided route gets one gradient per (pattern, offset class) from flex, in flex's layout, and
sums them into dq (B, H, N, D) in natural order. Variants, each timed alone (CUDA events, median of 20):

- vjp of strided slices: what autograd makes of the class views taken as ``x[start:stop:step]`` (static shapes:
  torch 2.11's guards failed on the dynamic vjp);
- vjp: the same of `_folded_view`, which takes them as an unflatten and a select (`strided._every`);
- place: each pattern's class gradients placed like the merge places outputs (`_place_all`), summed;
- place, B and N dynamic: the same compiled a second time at another B and N, as the route compiles;
- eager-adds: the first pattern's gradient copied into place, every other class added into its strided view;
and, as yardsticks, a copy of dq and a sum of three dq-sized tensors.
"""

import sys

import torch

from flexdilated.spec import DilatedSpec
from flexdilated.strided import _folded_view, _place_all, _unfold, head_classes

B, H, N, D, W = 8, 8, 32768, 64, 8192
SPEC = DilatedSpec((2048, 4096, 8192), (1, 2, 4))
CLASSES = head_classes(SPEC, H, H)
dev, dt = "cuda", torch.bfloat16


def views(q):
    q5 = q.narrow(2, 0, q.shape[2] // W * W).unflatten(2, (-1, W))  # as `strided._chunks` cuts them
    return tuple(_folded_view(q5, c.q_heads, c.branch.segment, c.branch.rate, c.offset, "heads") for c in CLASSES)


def slice_views(q):  # the views as strided slices, before NOTES attempt 17
    q5 = q.narrow(2, 0, q.shape[2] // W * W).unflatten(2, (-1, W))
    out = []
    for c in CLASSES:
        (start, stop, step), w, r = c.q_heads, c.branch.segment, c.branch.rate
        x = q5[:, start:stop:step].flatten(0, 1)
        x = x.unflatten(2, (x.shape[2] // w, w)).flatten(1, 2)
        out.append(x[:, :, c.offset :: r].transpose(0, 1))
    return tuple(out)


def vjp(q, gs):
    return torch.func.vjp(views, q)[1](tuple(gs))[0]


def slice_vjp(q, gs):
    return torch.func.vjp(slice_views, q)[1](tuple(gs))[0]


def place(q, gs):
    total = 0
    for p in sorted({c.pattern for c in CLASSES}):
        parts = [(c, _unfold(g, q.shape[0], "heads")) for c, g in zip(CLASSES, gs) if c.pattern == p]
        b = parts[0][0].branch
        total = total + _place_all(parts, num_heads=H, segment=b.segment, rate=b.rate, fill=0.0)
    return total


def eager_adds(q, gs):
    out = torch.empty_like(q)
    for i, (v, g) in enumerate(zip(views(out), gs)):
        v.copy_(g) if i == 0 else v.add_(g)
    return out


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    q = torch.randn(B, H, N, D, device=dev, dtype=dt)
    gs = [torch.randn(v.shape, device=dev, dtype=dt) for v in views(q)]
    want = eager_adds(q, gs).float()
    compiled_vjp = torch.compile(vjp, fullgraph=True, dynamic=False)
    compiled_slice_vjp = torch.compile(slice_vjp, fullgraph=True, dynamic=False)
    placed = torch.compile(place, fullgraph=True, dynamic=False)
    variants = {
        "vjp of strided slices": lambda: compiled_slice_vjp(q, gs),
        "vjp": lambda: compiled_vjp(q, gs),
        "place": lambda: placed(q, gs),
        "eager-adds": lambda: eager_adds(q, gs),
    }
    placed_dynamic = torch.compile(place, fullgraph=True)  # B and N dynamic, as in the route
    small = q[: B // 2, :, : N // 2].clone()
    placed_dynamic(small, [torch.randn(v.shape, device=dev, dtype=dt) for v in views(small)])
    variants["place, B and N dynamic"] = lambda: placed_dynamic(q, gs)
    rows = []
    for name, fn in variants.items():
        print(f"--- {name}", file=sys.stderr, flush=True)
        err = (fn().float() - want).abs().max().item()
        rows.append((name, timed(fn), err))
    a, b, c = (torch.randn_like(q) for _ in range(3))
    dst = torch.empty_like(q)
    rows.append(("copy dq (2 dq-sizes)", timed(lambda: dst.copy_(a)), 0.0))
    add3 = torch.compile(lambda a, b, c: a + b + c)
    rows.append(("a + b + c (4 dq-sizes)", timed(lambda: add3(a, b, c)), 0.0))
    size = q.numel() * q.element_size()
    print(f"\nB {B} H {H} N {N} D {D}: dq {size / 2**20:.0f} MiB; the assembly reads 1.75 dq-sizes and writes one")
    print(f"{'variant':28s} {'ms':>7s} {'max err':>8s}")
    for name, ms, err in rows:
        print(f"{name:28s} {ms:7.3f} {err:8.1e}")


if __name__ == "__main__":
    main()
