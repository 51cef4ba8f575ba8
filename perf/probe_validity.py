"""Why flex runs slower once its mask_mod reads key flags (`perf/NOTES.md` attempt 13): flex alone on class 0's
shapes of B 8 at 32,768 tokens (16 segments, 64 folded heads, 2048 rows, D 64, bf16), every key valid, the same
block tables (all full, or causal), and mask_mods that differ only in what they read:

- ``plain``: the pattern alone (no captured tensor);
- ``bool flags``: and ``keys[b, h, j]``, one bool per key (what `strided._valid_tables` gives flex);
- ``int8 flags``: the same flags as int8;
- ``interval``: and ``j < valid[b, h]``, one int32 per flex (batch, head): the valid keys of each as a prefix.

CUDA events, median of 10, forward and forward+backward.

    PYTHONPATH=$PWD:$PWD/perf python3 perf/probe_validity.py
"""

import json

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from bench import timed

flex = torch.compile(flex_attention)
S, Hf, L, D = 16, 64, 2048, 64
make = lambda: torch.randn(Hf, S, L, D, device="cuda", dtype=torch.bfloat16).transpose(0, 1).requires_grad_()  # noqa: E731
q, k, v = make(), make(), make()
grad = torch.randn_like(q)
flags = {"bool flags": torch.ones(S, Hf, L, dtype=torch.bool, device="cuda")}
flags["int8 flags"] = flags["bool flags"].to(torch.int8)
valid = torch.full((S, Hf), L, dtype=torch.int32, device="cuda")
rows = []
for causal in (False, True):
    tables = create_block_mask(lambda b, h, i, j: (j <= i) | (not causal), None, None, L, L, device="cuda").as_tuple()[2:10]

    def plain(b, h, i, j):
        return (j <= i) | (not causal)

    mods = {
        "plain": plain,
        "bool flags": lambda b, h, i, j: plain(b, h, i, j) & flags["bool flags"][b, h, j],
        "int8 flags": lambda b, h, i, j: plain(b, h, i, j) & (flags["int8 flags"][b, h, j] > 0),
        "interval": lambda b, h, i, j: plain(b, h, i, j) & (j < valid[b, h]),
    }
    for name, mod in mods.items():
        mask = BlockMask((L, L), *tables, BLOCK_SIZE=(128, 128), mask_mod=mod)
        for mode in ("fwd", "fwd+bwd"):
            torch._dynamo.reset()
            if mode == "fwd":
                with torch.no_grad():
                    ms = timed(lambda: flex(q, k, v, block_mask=mask), 10)
            else:
                ms = timed(lambda: flex(q, k, v, block_mask=mask).backward(grad), 10)
            rows.append((causal, name, mode, ms))
            print(json.dumps(dict(causal=causal, mask_mod=name, mode=mode, ms=ms)), flush=True)
for causal, name, mode, ms in rows:
    print(f"valid-probe causal={causal!s:5s} {name:11s} {mode:8s} {ms:7.3f} ms")
