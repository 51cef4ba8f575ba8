"""Inductor's code for the strided route's forward and backward, read on a CPU (no GPU needed).

    TORCH_LOGS=output_code PYTHONPATH=$PWD python3 perf/inductor_code_cpu.py [--causal] 2> code.log

CPU Inductor compiles no flex backward, so flex is stood in by an opaque custom op with flex's shapes and
contiguous outputs and gradients: the graph around it (views, merge, the gradients' assembly) is the route's, and
Inductor's C++ kernels for it show the index expressions and load masks its Triton kernels are built from (the
sympy is shared; the loop order and vectorisation are the C++ backend's). Two calls, the second at another B and
N, so that the second compile has them dynamic as the route has. Used in `perf/NOTES.md` attempt 17.
"""

import argparse
import warnings
from typing import NamedTuple

import torch

import flexdilated.strided as strided
from flexdilated import DilatedSpec
from flexdilated.strided import _strided_attention, _tables, strided_classes

warnings.filterwarnings("ignore")


class Aux(NamedTuple):
    lse: torch.Tensor


@torch.library.custom_op("flexdilated_probe::attn", mutates_args=())
def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (q + k + v).contiguous(), q.sum(-1).contiguous()


@attn.register_fake
def _(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1])


@torch.library.custom_op("flexdilated_probe::attn_bwd", mutates_args=())
def attn_bwd(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(g.clone(memory_format=torch.contiguous_format) for _ in range(3))


@attn_bwd.register_fake
def _(g):
    return g.new_empty(g.shape), g.new_empty(g.shape), g.new_empty(g.shape)


attn.register_autograd(lambda ctx, g, glse: attn_bwd(g))


def opaque_flex(q, k, v, block_mask=None, scale=None, enable_gqa=False, kernel_options=None, return_aux=None):
    out, lse = attn(q, k, v)
    return out, Aux(lse)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    strided.flex_attention = opaque_flex
    spec = DilatedSpec((256, 512, 1024), (1, 2, 4), causal=args.causal)
    route = torch.compile(_strided_attention, fullgraph=True)
    for B, N in ((2, 2048), (4, 4096)):
        q, k, v = (torch.randn(B, 8, N, 64, requires_grad=True) for _ in range(3))
        classes = strided_classes(q, k, spec)
        out = route(q, k, v, 1024, classes, *_tables(classes, args.causal, q.device), args.causal, 0.125)
        out[0].sum().backward()
        print(f"compiled and ran B {B}, N {N}", flush=True)


if __name__ == "__main__":
    main()
