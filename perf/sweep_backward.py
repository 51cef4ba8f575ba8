"""Flex's backward kernel options on the dense core's shapes, against FlashAttention (SDPA), one process.

    PYTHONPATH=$PWD python3 perf/sweep_backward.py [--out DIR]

The shapes are W1's gathered sub-sequences at 262,144 tokens: (128 segments, H 8, L 2048, D) in bf16, forward +
backward, causal and not. Each row is one `kernel_options` dict for flex's backward (fwd unchanged); the ratio is
flex over SDPA. The winners go into `flexdilated.kernels.BACKWARD_TILES` with their figures.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bench import timed

CANDIDATES = [  # (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages, num_warps); None: flex's default, on sm90
    None,         # at D 64-128 (64, 128, 128, 64, 3, 8) (torch/_inductor/template_heuristics/triton.py)
    (64, 128, 128, 64, 3, 4),
    (64, 64, 64, 64, 3, 4),
    (32, 128, 128, 32, 3, 4),
    (64, 128, 128, 64, 2, 8),
    (128, 128, 128, 128, 2, 8),
]


def options(c, prescale: bool) -> dict:
    out = {} if c is None else dict(zip(("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2",
                                        "bwd_num_stages", "bwd_num_warps"), c))
    return out | ({"PRESCALE_QK": True} if prescale else {})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--dims", default="64")
    args = parser.parse_args()
    records = []
    for D in map(int, args.dims.split(",")):
        for causal in (False, True):
            x = torch.randn(128, 8, 2048, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn_like(x)
            sdpa = timed(lambda: F.scaled_dot_product_attention(x, x, x, is_causal=causal).backward(g), 10)
            mask = create_block_mask((lambda b, h, i, j: j <= i) if causal else (lambda b, h, i, j: i >= 0),
                                     None, None, 2048, 2048, device="cuda")
            for c in CANDIDATES:
                for prescale in (False, True) if c is None else (False,):
                    torch._dynamo.reset()
                    flex = torch.compile(flex_attention)
                    opts = options(c, prescale)
                    try:
                        ms = timed(lambda: flex(x, x, x, block_mask=mask, kernel_options=opts).backward(g), 10)
                    except Exception as e:  # a config that does not fit the shared memory
                        print(f"D={D} causal={causal} {opts}: {type(e).__name__}", flush=True)
                        continue
                    rec = dict(D=D, causal=causal, options=opts, ms=ms, sdpa_ms=sdpa, ratio=ms / sdpa,
                               device=torch.cuda.get_device_name(), torch=torch.__version__)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                    if args.out:  # after each record: a run cut short keeps what it measured
                        with open(f"{args.out}/sweep_backward.json", "w") as f:
                            json.dump(records, f, indent=1)
    print(f"{'D':>3s} {'causal':6s} {'fwd+bwd ms':>10s} {'/sdpa':>6s}  options")
    for r in records:
        print(f"{r['D']:>3d} {str(r['causal']):6s} {r['ms']:10.2f} {r['ratio']:6.2f}  {r['options']}")


if __name__ == "__main__":
    main()
