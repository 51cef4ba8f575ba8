"""The strided route compiled with static shapes gets dq wrong on CUDA (`perf/NOTES.md` attempt 19); this finds it.

    PYTHONPATH=$PWD python3 perf/probe_static_dq.py

1. The route as main compiles it (B and N symbolic) against the same route with static shapes (its
   `maybe_mark_dynamic` marks switched off), on one input: differences of out, LSE, dq, dk, dv, and the heads and
   rows where dq differs. (H200, torch 2.11: out, LSE, dk, dv equal; dq wrong on heads 1-7, up to 1.4 where
   |dq| <= 3.8: right only on head 0, the one head that comes first in every class it is in.)
2. Compiled flex alone on one class's strided views (offset 0 and 1; views made inside the compiled function, as
   in the route, or outside; static and dynamic) against flex on contiguous copies. (H200: all equal, so this
   does not reproduce 1.)
"""

from unittest import mock

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flexdilated import DilatedSpec, dilated_attention


def route_static_vs_symbolic():
    spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4), causal=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 32768, 64, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 32768, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
    grad = torch.randn(1, 8, 32768, 64, device="cuda", generator=gen).bfloat16()

    def run():
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = dilated_attention(*xs, spec, return_lse=True)
        return (out, lse, *torch.autograd.grad((out * grad).sum(), xs))

    with mock.patch.object(torch._dynamo, "maybe_mark_dynamic", lambda x, dim: None):
        static = run()
    torch._dynamo.reset()
    symbolic = run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), static, symbolic):
        diff, top = (a.float() - b.float()).abs(), b.float().abs().max().item()
        print(f"static vs symbolic {name}: largest difference {diff.max().item():.3g} (largest |value| {top:.3g})")
        if diff.max() > 1e-2 * top:
            bad = ((diff.amax(-1) if diff.dim() == 4 else diff) > 1e-2 * top).nonzero()
            print(f"  {bad.shape[0]} (b, h, row) differ; heads {bad[:, 1].unique().tolist()}; first {bad[:4].tolist()}")


def class_views(x, w, r, o):
    """(B, H, N, D) -> (B * N // w, H, rows of offset o, D): segments of w in flex's batch, every r-th row from o."""
    B, H, N, D = x.shape
    return x.unflatten(2, (N // w, w))[:, :, :, o::r].transpose(1, 2).flatten(0, 1)


def flex_on_views():
    w, r = 4096, 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, g = (torch.randn(1, 8, 32768, 64, device="cuda", generator=gen).bfloat16() for _ in range(4))
    mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, w // r, w // r, device="cuda")
    for inside, dynamic in ((False, False), (False, True), (True, False), (True, True)):
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=dynamic)
        for o in range(r):
            def grads(copy):
                xs = [x.clone().requires_grad_() for x in (q, k, v)]

                def f(q, k, v):
                    vs = [class_views(x, w, r, o) for x in (q, k, v)]
                    return flex_attention(*[x.contiguous() for x in vs] if copy else vs, block_mask=mask)

                if inside:  # the views inside the compiled graph, as in the route
                    out = torch.compile(f, dynamic=dynamic)(*xs)
                else:
                    vs = [class_views(x, w, r, o) for x in xs]
                    out = flex(*[x.contiguous() for x in vs] if copy else vs, block_mask=mask)
                return (out, *torch.autograd.grad((out * class_views(g, w, r, o)).sum(), xs))

            a, b = grads(False), grads(True)
            print(f"flex on views (inside the graph {inside}, dynamic {dynamic}, offset {o}) vs on copies: " + ", ".join(
                f"{n} {(x.float() - y.float()).abs().max().item():.3g}" for n, x, y in zip(("out", "dq", "dk", "dv"), a, b)))


if __name__ == "__main__":
    route_static_vs_symbolic()
    flex_on_views()
