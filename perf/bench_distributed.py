"""Sequence-parallel benchmark of dilated attention (torchrun, one process per GPU; CUDA events, warm-up, median).

    torchrun --nproc-per-node 1 perf/bench_distributed.py --out DIR --tokens-per-rank 1048576      # one GPU
    torchrun --nproc-per-node 8 perf/bench_distributed.py --out DIR --tokens-per-rank 1048576      # weak scaling
    torchrun --nproc-per-node 8 perf/bench_distributed.py --out DIR --seq-len 8388608               # strong scaling
    python perf/bench_distributed.py --out DIR --combine A.json B.json     # merge runs, fill efficiency, table
    torchrun --nproc-per-node 2 perf/bench_distributed.py --out /tmp/b --tokens-per-rank 1024 \\
        --heads 2 --head-dim 16 --global-keys 256 --reps 2          # CPU (gloo) smoke test

Each rank holds n = N / P tokens of q, k, v (B, H, n, D), bf16 on CUDA, float32 on CPU. Workloads (`--specs`):
- W1:        w = (2048, 4096, 8192), r = (1, 2, 4): local whenever n is a multiple of 8192 (no communication);
- W1-global: W1 plus LongNet's whole-sequence pattern (w = N, r = N / global_keys): it spans every rank, each rank
             sends its share of the sparsified keys/values (global_keys rows per head class in all).
For each workload, causality, algorithm ("all_gather", "ring"; at world size 1 nothing spans: one run, algorithm
"local") and mode (fwd, fwd+bwd) it records the slowest rank's median time, the bytes each rank sent (counted by
`count_bytes`, the same on every rank), and on CUDA the peak memory; and, to separate communication:
- ms_local:      the same call with the spec's local patterns only (the spanning patterns' share = ms - ms_local);
- collective_ms: one all-gather (`all_gather_into_tensor`) over the whole group carrying the forward's counted
                 bytes (each rank sending bytes_sent_fwd / (P - 1)): the wire time of the forward's traffic.
One JSON record per run is appended to DIR/dist_results.json (rank 0). Weak-scaling records (``--tokens-per-rank``)
get ``efficiency = ms(P = 1) / ms(P)``, strong-scaling ones (``--seq-len``) ``ms(P = 1) / (P · ms(P))``, when the
world-size-1 record is in the same file (or in the files given to ``--combine``). Prints a table last.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)  # NVLink multicast off in every process

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from flexdilated import DilatedSpec  # noqa: E402
from flexdilated.distributed import count_bytes, sequence_parallel_attention  # noqa: E402

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")  # torch 2.13's rename
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

W1 = ((2048, 4096, 8192), (1, 2, 4))


def make_spec(name: str, N: int, causal: bool, global_keys: int) -> DilatedSpec:
    segments, rates = W1
    if name == "W1-global":
        segments, rates = segments + (N,), rates + (max(1, N // global_keys),)
    elif name != "W1":
        raise ValueError(f"unknown workload {name!r}: W1 or W1-global")
    return DilatedSpec(segments, rates, causal=causal)


def split(spec: DilatedSpec, n: int, N: int):
    """(local patterns, spanning patterns) at n tokens per rank (a segment >= N counts as N)."""
    patterns = [(min(w, N), r) for w, r in spec.patterns]
    return [p for p in patterns if n % p[0] == 0], [p for p in patterns if n % p[0]]


def timed(fn, reps: int, warm: int, cuda: bool) -> float:
    """Median ms of ``fn`` on this rank (CUDA events on GPU, perf_counter on CPU), every rep started together."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def slowest(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def attention_call(spec, shape, Hkv, dtype, device, mode, algorithm):
    """A closure running one forward (+ backward) of this rank's shard on fresh random inputs."""
    B, H, n, D = shape
    grad = mode != "fwd"
    q = torch.randn(B, H, n, D, device=device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(B, Hkv, n, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
    dout = torch.randn(B, H, n, D, device=device, dtype=dtype) if grad else None

    def fn():
        with torch.enable_grad() if grad else torch.no_grad():
            out = sequence_parallel_attention(q, k, v, spec, algorithm=algorithm)
            if grad:
                out.backward(dout)

    return fn


def collective_ms(nbytes: int, P: int, device, reps: int, cuda: bool) -> float:
    """One all-gather over the group in which each rank sends ``nbytes / (P - 1)`` bytes (total ``nbytes``)."""
    if P == 1 or nbytes == 0:
        return 0.0
    x = torch.empty(nbytes // (P - 1), dtype=torch.uint8, device=device)
    y = torch.empty(P * x.numel(), dtype=torch.uint8, device=device)
    return slowest(timed(lambda: dist.all_gather_into_tensor(y, x), reps, 2, cuda), device)


def run(args, cuda: bool, device, dtype) -> list[dict]:
    P, rank = dist.get_world_size(), dist.get_rank()
    scaling = "strong" if args.seq_len else "weak"
    N = args.seq_len or args.tokens_per_rank * P
    if N % P:
        raise SystemExit(f"--seq-len {N} is not divisible by the world size {P}")
    n = N // P
    B, H, D = args.batch, args.heads, args.head_dim
    name = torch.cuda.get_device_name() if cuda else "cpu"
    records = []
    for workload in args.specs.split(","):
        for causal in [c.strip().lower() in ("1", "true", "yes") for c in args.causal.split(",")]:
            spec = make_spec(workload, N, causal, args.global_keys)
            local, spanning = split(spec, n, N)
            local_spec = (
                replace(spec, segment_lengths=tuple(w for w, _ in local), dilation_rates=tuple(r for _, r in local))
                if local else None
            )
            torch._dynamo.reset()  # each workload compiles its own kernels (bench.py: Dynamo's recompile limit)
            algorithms = args.algorithms.split(",") if spanning else ["local"]
            for algorithm in algorithms:
                for mode in args.modes.split(","):
                    call = attention_call(spec, (B, H, n, D), args.kv_heads or H, dtype, device, mode,
                                          "all_gather" if algorithm == "local" else algorithm)
                    t0 = time.perf_counter()
                    with count_bytes() as sent:
                        call()
                    if cuda:
                        torch.cuda.synchronize()
                    first = slowest(time.perf_counter() - t0, device)
                    ms = slowest(timed(call, args.reps, args.warm, cuda), device)
                    peak = None
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        call()
                        torch.cuda.synchronize()
                        peak = int(slowest(torch.cuda.max_memory_allocated(), device))
                    ms_local = ms
                    if spanning:
                        ms_local = 0.0
                        if local_spec is not None:
                            only_local = attention_call(local_spec, (B, H, n, D), args.kv_heads or H, dtype, device,
                                                        mode, "all_gather")
                            ms_local = slowest(timed(only_local, args.reps, args.warm, cuda), device)
                    rec = dict(
                        workload=workload, impl="flexdilated-sp", algorithm=algorithm, scaling=scaling,
                        world_size=P, B=B, H=H, Hkv=args.kv_heads or H, N=N, tokens_per_rank=n, D=D,
                        dtype=str(dtype).removeprefix("torch."), causal=causal, spec=str(spec.patterns),
                        local_patterns=str(local), spanning_patterns=str(spanning), mode=mode, ms=ms,
                        ms_local=ms_local, collective_ms=collective_ms(sent["forward"], P, device, args.reps, cuda),
                        bytes_sent_fwd=sent["forward"], bytes_sent_bwd=sent["backward"], peak_bytes=peak,
                        first_call_s=first, device=name, backend=dist.get_backend(), torch=torch.__version__,
                    )
                    records.append(rec)
                    if rank == 0:
                        print(json.dumps(rec), flush=True)
                    del call
                    if cuda:
                        torch.cuda.empty_cache()
    return records


def fill_efficiency(records: list[dict]) -> None:
    """efficiency = ms(P=1) / ms(P) (weak) or ms(P=1) / (P ms(P)) (strong), matching workload, causal, mode,
    sizes and spec kind; the world-size-1 record runs no collective, so it serves every algorithm."""
    for r in records:
        key = ("workload", "causal", "mode", "B", "H", "D", "dtype", "device", "scaling")
        size = "tokens_per_rank" if r["scaling"] == "weak" else "N"
        ones = [o for o in records if o["world_size"] == 1 and o[size] == r[size] and all(o[k] == r[k] for k in key)]
        if ones:
            base = ones[-1]["ms"]
            r["efficiency"] = base / r["ms"] if r["scaling"] == "weak" else base / (r["world_size"] * r["ms"])


def print_table(records: list[dict]) -> None:
    print("\nms: slowest rank, median; local: the same call with the local patterns only; coll: one all-gather of the"
          " forward's bytes; eff: weak ms(1)/ms(P), strong ms(1)/(P ms(P))")
    print(f"{'workload':10s} {'scal':6s} {'P':>2s} {'N':>11s} {'n/rank':>10s} {'causal':6s} {'algorithm':10s} "
          f"{'mode':7s} {'ms':>9s} {'local ms':>9s} {'coll ms':>8s} {'MB fwd':>8s} {'MB bwd':>8s} {'peak GiB':>8s} "
          f"{'eff':>5s}")
    for r in records:
        peak = f"{r['peak_bytes'] / 2**30:8.2f}" if r.get("peak_bytes") else f"{'-':>8s}"
        eff = f"{r['efficiency']:5.2f}" if "efficiency" in r else f"{'-':>5s}"
        print(f"{r['workload']:10s} {r['scaling']:6s} {r['world_size']:2d} {r['N']:>11,d} {r['tokens_per_rank']:>10,d} "
              f"{str(r['causal']):6s} {r['algorithm']:10s} {r['mode']:7s} {r['ms']:9.2f} {r['ms_local']:9.2f} "
              f"{r['collective_ms']:8.2f} {r['bytes_sent_fwd'] / 1e6:8.3f} {r['bytes_sent_bwd'] / 1e6:8.3f} {peak} {eff}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory: records are appended to DIR/dist_results.json")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tokens-per-rank", type=int, default=None, help="weak scaling: n fixed, N = P n (default 1M)")
    size.add_argument("--seq-len", type=int, default=None, help="strong scaling: N fixed, n = N / P")
    parser.add_argument("--specs", default="W1,W1-global", help="comma-separated: W1, W1-global")
    parser.add_argument("--global-keys", type=int, default=16384,
                        help="W1-global's pattern (N, N / global_keys): keys (rows) per head class in all")
    parser.add_argument("--causal", default="false", help="comma-separated: false,true")
    parser.add_argument("--algorithms", default="all_gather,ring")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="merge the records of these files into DIR/dist_results.json, fill efficiency, print")
    args = parser.parse_args()
    path = os.path.join(args.out, "dist_results.json")
    if args.combine:
        records = [r for p in args.combine for r in json.load(open(p))]
        fill_efficiency(records)
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
        print_table(records)
        return
    if args.tokens_per_rank is None and args.seq_len is None:
        args.tokens_per_rank = 1048576

    cuda = args.device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    torch.manual_seed(dist.get_rank())
    records = run(args, cuda, device, dtype)
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        every = json.load(open(path)) if os.path.exists(path) else []
        every += records
        fill_efficiency(every)
        with open(path, "w") as f:
            json.dump(every, f, indent=1)
        print_table(every)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
