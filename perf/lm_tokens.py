"""Training-step throughput of a LongNetLM (tokens/s) against the same model with dense causal SDPA (flash)
attention, at N = 32,768 and 1,048,576 (B = 1, bf16 autocast, AdamW). CUDA events, 2 warm-ups, median of 5
(dense SDPA at 1M: one warm-up, one step).

    PYTHONPATH=$PWD python3 perf/lm_tokens.py [--lengths 32768,1048576] [--out DIR]

The dense model is LongNetLM itself with `flexdilated.modules.dilated_attention` replaced by
`F.scaled_dot_product_attention(is_causal=True)`: same weights, projections, norms and feed-forward.
"""

import argparse
import json
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

import flexdilated.modules as modules
from flexdilated import LongNetLM

from bench import timed


def sdpa(q, k, v, spec, key_padding_mask=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, enable_gqa=q.shape[1] != k.shape[1])


def step_ms(model, opt, tokens, reps, warm):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, reps=reps, warm=warm)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="32768,1048576")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for N in map(int, args.lengths.split(",")):
        torch.manual_seed(0)
        model = LongNetLM(256, 512, 4, 8, (2048, 4096, 8192), (1, 2, 4), checkpointing=N > 65536).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        tokens = torch.randint(0, 256, (1, N + 1), device="cuda")
        for impl in ("flexdilated", "dense_sdpa"):
            slow = impl == "dense_sdpa" and N > 65536  # ~40 s per step: one warm-up, one timed step
            with mock.patch.object(modules, "dilated_attention", sdpa) if impl == "dense_sdpa" else nullcontext():
                ms = step_ms(model, opt, tokens, reps=1 if slow else 5, warm=1 if slow else 2)
            rows.append(dict(impl=impl, N=N, ms=ms, tokens_per_s=N / ms * 1e3, model="LongNetLM dim 512 depth 4 "
                             "heads 8 w=(2048,4096,8192) r=(1,2,4)", device=torch.cuda.get_device_name(),
                             torch=torch.__version__))
            print(rows[-1], flush=True)
        del model, opt
        torch.cuda.empty_cache()
    if args.out:
        with open(f"{args.out}/lm_tokens.json", "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'impl':12s} {'N':>10s} {'step ms':>10s} {'tokens/s':>12s}")
    for r in rows:
        print(f"{r['impl']:12s} {r['N']:>10,d} {r['ms']:10.1f} {r['tokens_per_s']:12,.0f}")


if __name__ == "__main__":
    main()
