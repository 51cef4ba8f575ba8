"""Profile one `dilated_attention` forward (W1, bf16, N from argv) with torch.profiler: where the time goes.

    PYTHONPATH=$PWD python3 perf/profile_core.py 65536
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from flexdilated import DilatedSpec, dilated_attention

N = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4))
q, k, v = (torch.randn(1, 8, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
with torch.no_grad():
    for _ in range(3):
        dilated_attention(q, k, v, spec)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        dilated_attention(q, k, v, spec)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
