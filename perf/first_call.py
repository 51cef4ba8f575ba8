"""Where a cold first call of `dilated_attention` goes: wall time of the forward and of forward + backward, and
Dynamo's and Inductor's phase times (`torch._dynamo.utils.compile_times`). Run it from a cold process and an
empty Inductor cache:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) PYTHONPATH=$PWD python3 perf/first_call.py [--batch 8] [--causal]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import compile_times, counters

from flexdilated import DilatedSpec, dilated_attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4), causal=args.causal)
    q, k, v = (torch.randn(args.batch, 8, args.length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    start = time.perf_counter()
    out = dilated_attention(q, k, v, spec)
    torch.cuda.synchronize()
    forward = time.perf_counter() - start
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print(f"first call: forward {forward:.1f} s, forward + backward {time.perf_counter() - start:.1f} s")
    print(compile_times(repr="str", aggregate=True))
    print({key: n for key, n in counters["inductor"].items() if n})


if __name__ == "__main__":
    main()
