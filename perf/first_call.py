"""Where a first call of forward + backward goes: wall time of the forward and of forward + backward, Dynamo's and
Inductor's phase times (`torch._dynamo.utils.compilation_time_metrics`), the graphs compiled and the Triton
kernels this process added to the cache.
Run it from a cold process; with an empty Inductor cache it times a cold compile, run again with the same cache
it times what a user's second process pays. With more lengths, each later call is timed too (a new N: what its
recompile costs):

    TORCHINDUCTOR_CACHE_DIR=$DIR PYTHONPATH=$PWD python3 perf/first_call.py [--impl dense_core] [--batch 8] [--causal]
        [--lengths 32768,24576]

`--impl dense_core` is the yardstick: `bench.py`'s dense core (compiled flex, a full or causal block mask) on the
same sub-sequence shapes.
Prints one JSON record last.
"""

from __future__ import annotations

import time

start_import = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402
from torch._dynamo.utils import compilation_time_metrics, counters  # noqa: E402
from torch._inductor import metrics  # noqa: E402

from bench import W1, Workload, dense_core_inputs, flex  # noqa: E402
from flexdilated import DilatedSpec, dilated_attention  # noqa: E402
from flexdilated.kernels import kernel_options  # noqa: E402

imported = time.perf_counter() - start_import


def triton_kernels(cache_dir: str) -> set[str]:
    """The compiled Triton kernels (cubin files) in the Inductor cache."""
    return {os.path.join(root, name) for root, _, files in os.walk(os.path.join(cache_dir, "triton"))
            for name in files if name.endswith(".cubin")}


def kind(path: str) -> str:
    """A kernel's kind, from its file name: flex forward, flex backward or another Inductor kernel."""
    name = os.path.basename(path)
    return "flex bwd" if "flex_attention_backward" in name else "flex fwd" if "flex_attention" in name else "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("flexdilated", "dense_core"), default="flexdilated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", default="32768", help="comma-separated N, one call each")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    spec = DilatedSpec(*W1, causal=args.causal)
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    cached = triton_kernels(cache_dir) if cache_dir else set()
    torch.cuda.init()
    later = []
    for i, N in enumerate(lengths):
        w = Workload(f"B{args.batch}", spec, 8, (N,), B=args.batch)
        if args.impl == "flexdilated":
            q, k, v = (torch.randn(w.B, w.heads, N, w.D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            call = lambda: [dilated_attention(q, k, v, w.spec)]  # noqa: E731
        else:
            cases = dense_core_inputs(w, N)
            xs = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s, _ in cases]
            call = lambda: [flex(x, x, x, block_mask=m, kernel_options=kernel_options(x))  # noqa: E731
                            for x, (_, m) in zip(xs, cases)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = call()
        torch.cuda.synchronize()
        forward = time.perf_counter() - start
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        if i == 0:
            first = forward, total, counters["stats"]["unique_graphs"]
            phases = sorted(((sum(v), k) for k, v in compilation_time_metrics.items()), reverse=True)
        else:
            later.append(dict(N=N, forward_backward_s=round(total, 2)))
        del outs

    print("first call's phases (s, summed over compiles; nested phases overlap)")
    for seconds, name in phases[:25]:
        print(f"  {seconds:8.2f}  {name}")
    record = dict(
        impl=args.impl, B=args.batch, N=lengths[0], causal=args.causal, import_s=round(imported, 2),
        forward_s=round(first[0], 2), forward_backward_s=round(first[1], 2), graphs=first[2], later_calls=later,
        graphs_in_all=counters["stats"]["unique_graphs"], kernels_generated=metrics.generated_kernel_count,
        triton_kernels_added=dict(Counter(map(kind, triton_kernels(cache_dir) - cached))) if cache_dir else None,
        fx_graph_cache={k: n for k, n in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        phases={name: round(seconds, 2) for seconds, name in phases[:25]},
        device=torch.cuda.get_device_name(), torch=torch.__version__,
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
