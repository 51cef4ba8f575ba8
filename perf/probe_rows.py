"""Probe: the packed-documents copies at 1M tokens (H 8, D 64, bf16, bench.py's documents), each way timed alone.

    PYTHONPATH=$PWD python3 perf/probe_rows.py
"""

from itertools import accumulate

import torch

from bench import Workload, document_lengths, timed
from flexdilated import DilatedSpec
from flexdilated.documents import _Align, _places, _storage_rows, _take_rows, _Unalign

H, N, D, W = 8, 1048576, 64, 8192
lengths = document_lengths(Workload("documents", DilatedSpec((8192,), (1,)), H, (N,), documents=16384), N)
sizes = [-(-n // W) * W for n in lengths]
T = sum(sizes)
starts = list(accumulate([0, *lengths[:-1]]))
shift = torch.tensor([a - s for a, s in zip(accumulate([0, *sizes[:-1]]), starts)], device="cuda")
tokens = torch.arange(N, device="cuda")
at = tokens + shift.repeat_interleave(torch.tensor(lengths, device="cuda"), output_size=N)
src = torch.arange(T, device="cuda") % N
src[at] = tokens
x = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
y = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
g = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
rows, first, (sb, sh, st) = _storage_rows(x)
index = (first + src * st + torch.arange(H, device="cuda")[:, None] * sh).flatten()
places = _places(at, 1, H, T)
gather = torch.compile(lambda x, i: x[i], dynamic=False)
cases = {
    "old align: (N, H, D) view .index_select(0, src)": lambda: x.transpose(1, 2).reshape(N, H, D).index_select(0, src),
    "align, bf16 rows .index_select": lambda: rows.index_select(0, index),
    "align, int64 words .index_select": lambda: rows.view(torch.int64).index_select(0, index),
    "align, _take_rows (compiled x[index], dynamic rows)": lambda: _take_rows(rows, index),
    "align, x.view(-1, D)[index]": lambda: rows[index],
    "align, compiled x[index]": lambda: gather(rows, index),
    "old unalign: y[0].index_select(1, at)": lambda: y[0].index_select(1, at),
    "unalign, _take_rows": lambda: _take_rows(y.view(-1, D), places),
    "old align backward: index_add": lambda: torch.zeros(N, H, D, device="cuda", dtype=torch.bfloat16).index_add_(0, src, y[0].transpose(0, 1)),
    "unalign backward: zeros + index_copy words": lambda: _Unalign.backward(type("C", (), {"saved_tensors": (places,), "shape": y.shape})(), g),
    "Align.apply": lambda: _Align.apply(x, src, places),
    "Unalign.apply": lambda: _Unalign.apply(y, places, 1),
}
gib = N * H * D * 2 / 2**30
print(f"T = {T} aligned tokens for N = {N}; one pass over x is {gib:.2f} GiB")
for name, fn in cases.items():
    print(f"{timed(fn, 10):8.3f} ms  {name}")
