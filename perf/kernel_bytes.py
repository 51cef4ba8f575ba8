"""Bytes over bandwidth: every Inductor kernel of one `dilated_attention` step, timed alone, with the bytes it moves.

    PYTHONPATH=$PWD python3 perf/kernel_bytes.py [--only tail,views] [--length N] [--modes fwd+bwd] [--out DIR]

Runs each `bench.py` workload (its first length, or ``--length``) under Inductor's bandwidth profiler
(``TORCHINDUCTOR_PROFILE``): each compiled kernel is benchmarked alone (L2 flushed) and its bytes are those of its
arguments (Inductor's own estimate: every input and output read or written once, whole). Prints, per workload, the
kernels by kind (flex's forward and backward templates, Inductor's other kernels) with summed ms, GB and GB/s,
the costliest non-flex kernels, and the ceiling they are measured against: a plain device copy of 1 GiB. Eager
kernels (autograd's sums into .grad, eager gathers) are not compiled and not listed: `profile_core.py` times them.
The profiler replaces the kernels' results by their timings (a kernel runs only while benchmarked, on copies of
its in-place arguments): the numbers are times, the outputs are not to be used. A kernel's time alone can be far
from its time in the step (the views' gradient assembly `..._20`: 10.2 ms alone, where all of Inductor's other
kernels took 3.3 ms in the step, `perf/results/kernel_bytes_views.txt`; copies of its in-place argument timed
with it are the likely cause, not checked): for time in the step use `profile_core.py`, and this listing for the
bytes, which at the ceiling give the least time the kernels can take.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile

PROFILE = os.path.join(tempfile.mkdtemp(), "kernels.txt")
os.environ["TORCHINDUCTOR_PROFILE"] = "1"  # read when Inductor's config is imported: before torch
os.environ["TORCHINDUCTOR_PROFILE_OUTPUT"] = PROFILE

import torch  # noqa: E402

torch._inductor.config.benchmark_harness = False  # (torch 2.11 calls the harness without its arguments, and fails)

from bench import dilated_step, label, workloads  # noqa: E402
from profile_core import kind  # noqa: E402

LINE = re.compile(r"^\s*([\d.]+)ms\s+([\d.]+) GB\s+([\d.]+)GB/s\s+[\d.]+%\s+(\S+)")


def copy_ceiling() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted), median of 20."""
    x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    ms = sorted(times[5:])[len(times[5:]) // 2]
    return 2 * x.numel() * x.element_size() / 1e9 / (ms / 1e3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="tail,views")
    parser.add_argument("--modes", default="fwd+bwd")
    parser.add_argument("--length", type=int, default=None, help="N instead of each workload's first length")
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for the profiler's raw per-graph listing")
    args = parser.parse_args()
    ceiling = copy_ceiling()
    print(f"ceiling: device copy of 1 GiB, {ceiling:.0f} GB/s (read + write)")
    for w in workloads(quick=False):
        if label(w) not in args.only.split(","):
            continue
        N = args.length or w.lengths[0]
        for mode in args.modes.split(","):
            call = dilated_step(w, N, mode)
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                call()  # compiles; each kernel is benchmarked the first time it runs
                torch.cuda.synchronize()
                if os.path.exists(PROFILE):
                    os.remove(PROFILE)
                call()  # the listing of one step, from the cached timings
                torch.cuda.synchronize()
            with open(PROFILE) as f:
                text = f.read()
            if args.out:
                with open(os.path.join(args.out, f"kernels_{label(w)}_{mode}.txt"), "w") as f:
                    f.write(text)
            kernels = [(float(m[1]), float(m[2]), m[4]) for m in map(LINE.match, text.splitlines()) if m]
            print(f"\n=== {label(w)} N {N} B {w.B} {mode}: {len(kernels)} compiled kernels")
            by_kind: dict[str, list[float]] = {}
            for ms, gb, name in kernels:
                total = by_kind.setdefault(kind(name), [0, 0.0, 0.0])
                total[0] += 1
                total[1] += ms
                total[2] += gb
            for what, (n, ms, gb) in sorted(by_kind.items()):
                rate = f"{gb / (ms / 1e3):7.0f} GB/s ({gb / (ms / 1e3) / ceiling:4.0%} of the copy)" \
                    if what == "inductor other" else ""
                print(f"  {what:15s} {n:3d} kernels {ms:8.2f} ms {gb:8.2f} GB {rate}")
            others = sorted((x for x in kernels if kind(x[2]) == "inductor other"), reverse=True)
            print(f"  costliest other kernels (ms, GB, share of the copy's bandwidth; at the ceiling they would take):")
            for ms, gb, name in others[: args.rows]:
                bound = gb / ceiling * 1e3
                print(f"    {ms:7.3f} ms {gb:7.3f} GB {gb / (ms / 1e3) / ceiling:5.0%}  {bound:7.3f} ms  {name[:70]}")
            del call
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
