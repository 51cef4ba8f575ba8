"""Why flex with key-validity tables runs slower on the same blocks (`perf/NOTES.md` attempt 12): flex alone on
class 0's shapes of B 8 at 32,768 tokens (16 segments, 64 folded heads, 2048 rows), all key flags True, with
broadcast or per-(segment, head) tables, and a mask_mod with or without the flags. CUDA events, median of 10.

    PYTHONPATH=$PWD python3 perf/probe_validity.py
"""

import json

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from bench import timed

flex = torch.compile(flex_attention)
S, Hf, L, D = 16, 64, 2048, 64
q = torch.randn(Hf, S, L, D, device="cuda", dtype=torch.bfloat16).transpose(0, 1)  # (S, Hf, L, D), heads outermost as folded
keys = torch.ones(S, Hf, L, dtype=torch.bool, device="cuda")
rows = []
for causal in (False, True):
    base = create_block_mask((lambda b, h, i, j: j <= i) if causal else (lambda b, h, i, j: i >= 0), None, None, L, L, device="cuda")
    t = base.as_tuple()[2:10]  # kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx
    plain = lambda b, h, i, j: (j <= i) | (not causal)
    keymod = lambda b, h, i, j: plain(b, h, i, j) & keys[b, h, j]
    big = [z.expand(S, Hf, *z.shape[2:]).contiguous() for z in t]
    variants = {
        "broadcast tables, plain mask": BlockMask((L, L), *t, BLOCK_SIZE=(128, 128), mask_mod=plain),
        "per-(seg,head) tables, plain mask": BlockMask((L, L), *big, BLOCK_SIZE=(128, 128), mask_mod=plain),
        "broadcast tables, key mask": BlockMask((L, L), *t, BLOCK_SIZE=(128, 128), mask_mod=keymod),
        "per-(seg,head) tables, key mask": BlockMask((L, L), *big, BLOCK_SIZE=(128, 128), mask_mod=keymod),
    }
    for name, m in variants.items():
        torch._dynamo.reset()
        ms = timed(lambda: flex(q, q, q, block_mask=m), 10)
        rows.append((causal, name, ms))
        print(json.dumps(dict(causal=causal, variant=name, ms=ms)), flush=True)
for causal, name, ms in rows:
    print(f"valid-probe causal={causal!s:5s} {name:36s} {ms:7.3f} ms")
