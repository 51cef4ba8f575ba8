"""Profile `dilated_attention` on `bench.py` workloads with torch.profiler: where the time goes, GPU and host.

    PYTHONPATH=$PWD python3 perf/profile_core.py [--only tail,padding] [--modes fwd,fwd+bwd] [--length N] [--out DIR]

For each workload (its first length, or ``--length``) and mode it prints the call's wall time (CUDA events), the
summed GPU kernel time (the gap between them is GPU idle, usually host time the GPU waits for), the host time until
the call returns, the kernel time by kind (flex forward, flex backward, Inductor's other kernels, the rest) and the
kernels and host operations that cost most. With ``--out``, a Chrome trace per case.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import dilated_step, label, workloads


def kind(name: str) -> str:
    """What a kernel is, from its name: flex's forward or backward template, another Inductor kernel, or aten's."""
    if "flex_attention_backward" in name:
        return "flex bwd"
    if "flex_attention" in name:
        return "flex fwd"
    return "inductor other" if name.startswith("triton_") else "aten/other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="tail,padding,documents,documents-causal")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--length", type=int, default=None, help="N instead of each workload's first length")
    args = parser.parse_args()
    summary = []
    for w in workloads(quick=False):
        if label(w) not in args.only.split(","):
            continue
        torch._dynamo.reset()
        N = args.length or w.lengths[0]
        for mode in args.modes.split(","):
            call = dilated_step(w, N, mode)
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                for _ in range(3):
                    call()
                torch.cuda.synchronize()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    start.record()
                    t0 = time.perf_counter()
                    call()
                    host_ms = (time.perf_counter() - t0) * 1e3
                    stop.record()
                    torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
            wall_ms = start.elapsed_time(stop)
            name = f"{label(w)} {mode}"
            print(f"\n=== {name}: wall {wall_ms:.2f} ms, GPU kernels {gpu_ms:.2f} ms, host until return {host_ms:.2f} ms")
            kinds = {}
            for e in kernels:
                what = kind(e.key)
                kinds[what] = kinds.get(what, 0.0) + e.self_device_time_total / 1e3
            print("  ".join(f"{k} {ms:.2f} ms" for k, ms in sorted(kinds.items()) if ms > 0))
            print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
            if args.out:
                prof.export_chrome_trace(f"{args.out}/trace_{name.replace(' ', '_')}.json")
            summary.append((name, wall_ms, gpu_ms, host_ms))
            del call
            torch.cuda.empty_cache()
    print(f"\n{'case':28s} {'wall ms':>8s} {'GPU ms':>8s} {'host ms':>8s}")
    for name, wall, gpu, host in summary:
        print(f"{name:28s} {wall:8.2f} {gpu:8.2f} {host:8.2f}")


if __name__ == "__main__":
    main()
