"""Side-by-side GPU benchmark of dilated attention (one process, CUDA events, warm-up, median).

    PYTHONPATH=$PWD python3 perf/bench.py --out DIR [--quick]

For each workload it times, on fresh random inputs:
- flexdilated:    the public `dilated_attention` (natural token order in and out);
- dense_core:     compiled `flex_attention` with no mask on tensors shaped like the gathered sub-sequences,
                  (B * ceil(N / w_i), H_i, ceil(w_i / r_i), D) per pattern, summed (causal mask when causal):
                  the same useful work without any sparsity overhead (packed documents: the segments of every
                  document alone, sum_d ceil(n_d / w_i)), with flexdilated's `kernel_options` (its backward tiles);
- sdpa_core:      the same shapes through `F.scaled_dot_product_attention` (FlashAttention);
- naive_pipeline: the official code's way: gather each pattern's tokens in plain PyTorch, flash attention with
                  its LSE per pattern, scatter back to natural order, merge by LSE (multiset semantics; timing
                  only: padding rows of w % r != 0 are not masked);
- dense_sdpa:     full `F.scaled_dot_product_attention` (flash) at the same N (N <= 1,048,576).
Forward and forward+backward, with peak memory. Writes DIR/results.json and DIR/time_vs_n.png and prints a
table of ratios last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flexdilated import DilatedSpec, dilated_attention
from flexdilated.kernels import kernel_options
from flexdilated.layout import gather, head_index, natural_index, units
from flexdilated.spec import branches

flex = torch.compile(flex_attention)


@dataclass(frozen=True)
class Workload:
    name: str
    spec: DilatedSpec
    heads: int
    lengths: tuple[int, ...]
    B: int = 1
    D: int = 64
    layout: str = "bhnd"  # "bnhd": q, k, v stored (B, N, H, D), passed as .transpose(1, 2) views
    padding: float = 0.0  # fraction of keys padded at the end of each row (key_padding_mask)
    documents: int = 0  # mean document length of packed documents (document_ids), 0: one sequence


W1 = ((2048, 4096, 8192), (1, 2, 4))
PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))


def workloads(quick: bool) -> list[Workload]:
    n1 = (65536,) if quick else (65536, 262144, 1048576)
    n2 = (32768,) if quick else (32768, 262144, 1048576)
    out = []
    for causal in (False, True):
        for overlap in ("multiset",) if quick else ("multiset", "set"):
            out.append(Workload("W1", DilatedSpec(*W1, causal=causal, overlap=overlap), 8, n1))
    out.append(Workload("W2", DilatedSpec(*PAPER), 12, n2))
    out.append(Workload("W3", DilatedSpec(*W1, heads="grouped"), 8, n1))
    if not quick:  # the shapes of training: a batch, any N, module layouts, padding, packed documents
        out += [Workload("B8", DilatedSpec(*W1, causal=causal), 8, (32768,), B=8) for causal in (False, True)]
        out.append(Workload("tail", DilatedSpec(*W1), 8, (1000000,)))
        out.append(Workload("views", DilatedSpec(*W1), 8, (262144,), B=2, layout="bnhd"))
        out.append(Workload("padding", DilatedSpec(*W1), 8, (32768,), B=8, padding=0.1))
        out += [Workload("documents", DilatedSpec(*W1, causal=causal), 8, (1048576,), documents=16384)
                for causal in (False, True)]
    return out


def document_lengths(w: Workload, N: int) -> list[int]:
    """Random document lengths (uniform in 1 .. 2 * mean - 1, seeded) cut to fill N tokens."""
    gen = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < N:
        lengths.append(min(int(torch.randint(1, 2 * w.documents, (), generator=gen)), N - sum(lengths)))
    return lengths


def label(w: Workload) -> str:
    return w.name + "-causal" * w.spec.causal + "-set" * (w.spec.overlap == "set")


def timed(fn, reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def dense_core_inputs(w: Workload, N: int):
    """Per pattern: (B * ceil(N / w_i), H_i, ceil(w_i / r_i), D) tensors (documents: sum_d ceil(n_d / w_i)
    segments) and a causal block mask if needed."""
    cases = []
    lengths = document_lengths(w, N) if w.documents else [N] * w.B
    for branch in branches(w.spec, w.heads):
        L = -(-branch.segment // branch.rate)
        shape = (sum(-(-n // branch.segment) for n in lengths), len(branch.heads), L, w.D)
        if w.spec.causal:
            mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, L, L, device="cuda")
        else:  # all blocks full: no masking work
            mask = create_block_mask(lambda b, h, i, j: i >= 0, None, None, L, L, device="cuda")
        cases.append((shape, mask))
    return cases


def naive_pipeline(q, k, v, spec: DilatedSpec):
    """Gather per pattern, flash attention with LSE, scatter back, LSE merge: all in plain PyTorch."""
    B, H, N, D = q.shape
    outs, lses = [], []
    for branch in branches(spec, H):
        heads = head_index(branch, 1, q.device)
        out_b = q.new_zeros(B, H, N + 1, D)
        lse_b = torch.full((B, H, N + 1), float("-inf"), device=q.device)
        for unit in units(branch, N, pad_tail=False):
            qg, kg, vg = (gather(x, branch, unit, heads) for x in (q, k, v))
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention(qg, kg, vg, 0.0, spec.causal)[:2]
            index = heads[:, None], natural_index(branch, unit, N, q.device)
            out_b[:, index[0], index[1]] = o.unflatten(0, (B, -1))
            lse_b[:, index[0], index[1]] = lse.unflatten(0, (B, -1))
        outs.append(out_b[:, :, :N])
        lses.append(lse_b[:, :, :N])
    lse = torch.stack(lses).logsumexp(0)
    weights = [torch.exp(l - lse).nan_to_num(0.0)[..., None] for l in lses]
    return sum(w * o.float() for w, o in zip(weights, outs)).to(q.dtype)


def check_naive_pipeline():
    """The baseline must compute what flexdilated computes (multiset, w % r == 0): print their difference."""
    spec = DilatedSpec(*W1, causal=True)
    q, k, v = (torch.randn(1, 8, 3 * 8192 + 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a, b = naive_pipeline(q, k, v, spec).float(), dilated_attention(q, k, v, spec).float()
    print(f"naive_pipeline vs flexdilated: relative difference {((a - b).norm() / b.norm()).item():.2e}")


def dilated_inputs(w: Workload, N: int, mode: str):
    """q, k, v (as the workload stores them), the output gradient (None for "fwd") and the keyword arguments
    (key_padding_mask, document_ids) of one `dilated_attention` call of the workload."""
    def make():
        x = torch.randn(w.B, N, w.heads, w.D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) \
            if w.layout == "bnhd" else torch.randn(w.B, w.heads, N, w.D, device="cuda", dtype=torch.bfloat16)
        return x.requires_grad_(mode != "fwd")

    q, k, v = make(), make(), make()
    grad = torch.randn(w.B, w.heads, N, w.D, device="cuda", dtype=torch.bfloat16) if mode != "fwd" else None
    extra = {}
    if w.padding:
        extra["key_padding_mask"] = torch.zeros(w.B, N, dtype=torch.bool, device="cuda")
        extra["key_padding_mask"][:, N - int(w.padding * N) :] = True
    if w.documents:
        lengths = torch.tensor(document_lengths(w, N), device="cuda")
        extra["document_ids"] = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), lengths)[None]
    return q, k, v, grad, extra


def dilated_step(w: Workload, N: int, mode: str):
    """One `dilated_attention` call of the workload on fresh inputs, with its backward unless mode is "fwd"."""
    q, k, v, grad, extra = dilated_inputs(w, N, mode)

    def step():
        out = dilated_attention(q, k, v, w.spec, **extra)
        if grad is not None:
            out.backward(grad)

    return step


def run_one(impl: str, w: Workload, N: int, mode: str, reps: int):
    if impl in ("dense_core", "sdpa_core"):
        cases = dense_core_inputs(w, N)
        xs = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd") for s, _ in cases]
        masks = [m for _, m in cases]

        def fn():
            if impl == "dense_core":
                outs = [flex(x, x, x, block_mask=m, kernel_options=kernel_options(x)) for x, m in zip(xs, masks)]
            else:
                outs = [F.scaled_dot_product_attention(x, x, x, is_causal=w.spec.causal) for x in xs]
            if mode != "fwd":
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    else:
        q, k, v, grad, extra = dilated_inputs(w, N, mode)
        call = {
            "flexdilated": lambda: dilated_attention(q, k, v, w.spec, **extra),
            "naive_pipeline": lambda: naive_pipeline(q, k, v, w.spec),
            "dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=w.spec.causal),
        }[impl]

        def fn():
            out = call()
            if mode != "fwd":
                out.backward(grad)

    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms = timed(fn, reps)
        peak = peak_bytes(fn)
    return ms, peak, first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="one N per workload, fewer repetitions (< 3 min)")
    parser.add_argument("--only", default=None, help="comma-separated workload labels to run, e.g. W1,W1-causal")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="merge the records of earlier runs into DIR/results.json, plot and print (no GPU work)")
    parser.add_argument("--lengths", default=None, help="comma-separated N instead of each workload's own")
    parser.add_argument("--impls", default="flexdilated,dense_core,sdpa_core,naive_pipeline,dense_sdpa",
                        help="comma-separated implementations to time (dense_sdpa at 1M costs ~2 min)")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    args = parser.parse_args()
    if args.combine:
        records = [r for path in args.combine for r in json.load(open(path))]
        with open(f"{args.out}/results.json", "w") as f:
            json.dump(records, f, indent=1)
        plot(records, f"{args.out}/time_vs_n.png")
        print_ratios(records)
        return
    reps = 5 if args.quick else 10
    device = torch.cuda.get_device_name()
    check_naive_pipeline()
    records = []
    for w in workloads(args.quick):
        if args.only and label(w) not in args.only.split(","):
            continue
        # Each workload compiles its own kernels: one process running many (heads per pattern, length, grad)
        # combinations passes Dynamo's limit of 8 compiled versions per function (README: Limits).
        torch._dynamo.reset()
        for N in map(int, args.lengths.split(",")) if args.lengths else w.lengths:
            for impl in args.impls.split(","):
                if impl != "flexdilated" and w.spec.overlap == "set":
                    continue  # the same work as for multiset (the official merge is multiset only)
                if impl == "dense_sdpa" and (w.name not in ("W1", "W2", "B8") or N > 1048576 or (args.quick and N > 65536)):
                    continue  # the other workloads' dense attention is W1's
                if impl == "naive_pipeline" and (w.padding or w.documents):
                    continue  # the official code has neither
                for mode in args.modes.split(","):
                    if impl == "dense_sdpa" and mode == "fwd+bwd" and N > 262144:
                        continue  # minutes per call, and the forward already makes the point
                    ms, peak, first = run_one(impl, w, N, mode, reps)
                    rec = dict(
                        workload=w.name, impl=impl, B=w.B, N=N, H=w.heads, D=w.D, layout=w.layout, causal=w.spec.causal,
                        heads=w.spec.heads, overlap=w.spec.overlap, padding=w.padding, documents=w.documents, mode=mode, ms=ms, peak_bytes=peak, first_call_s=first,
                        qkvo_bytes=4 * w.B * w.heads * N * w.D * 2, device=device, torch=torch.__version__,
                    )
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                    torch.cuda.empty_cache()
    name = "results.json" if not args.only else f"results_{args.only.replace(',', '_')}.json"
    if args.lengths:
        name = name.replace(".json", f"_N{args.lengths.replace(',', '_')}.json")
    with open(f"{args.out}/{name}", "w") as f:
        json.dump(records, f, indent=1)
    plot(records, f"{args.out}/time_vs_n.png")
    print_ratios(records)


def find(records, **key):
    hits = [r for r in records if all(r[k] == v for k, v in key.items())]
    return hits[0]["ms"] if hits else math.nan


def plot(records, path):
    try:
        from matplotlib.figure import Figure  # no pyplot: no backend to switch
    except ImportError:
        print("matplotlib not installed (pip install flexdilated[plot]): no plot")
        return
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for impl in ("flexdilated", "naive_pipeline", "dense_sdpa", "dense_core"):
        pts = sorted(
            (r["N"], r["ms"]) for r in records
            if r["impl"] == impl and r["workload"] == "W1" and r["mode"] == "fwd" and not r["causal"] and r["overlap"] == "multiset"
        )
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=impl)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward time (ms)")
    ax.set_title("W1: w=(2048,4096,8192) r=(1,2,4), H=8 D=64 bf16")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_ratios(records):
    print("ratios: /core and /sdpa = flexdilated over dense_core and sdpa_core (same useful work); "
          "naive/fd and sdpa/fd = speed-ups")
    print(f"{'workload':9s} {'B':>2s} {'N':>9s} {'causal':6s} {'overlap':8s} {'mode':7s} {'flexdil ms':>10s} {'/core':>6s} "
          f"{'/sdpa':>6s} {'naive/fd':>8s} {'sdpa/fd':>8s} {'peak/qkvo':>9s} {'first s':>7s}")
    for r in records:
        if r["impl"] != "flexdilated":
            continue
        key = dict(workload=r["workload"], N=r["N"], causal=r["causal"], heads=r["heads"], mode=r["mode"])
        core = find(records, impl="dense_core", **key)
        sdpa_core = find(records, impl="sdpa_core", **key)
        naive = find(records, impl="naive_pipeline", **key)
        sdpa = find(records, impl="dense_sdpa", N=r["N"], H=r["H"], causal=r["causal"], mode=r["mode"])
        print(f"{r['workload']:9s} {r['B']:>2d} {r['N']:>9,d} {str(r['causal']):6s} {r['overlap']:8s} {r['mode']:7s} "
              f"{r['ms']:10.2f} {r['ms'] / core:6.2f} {r['ms'] / sdpa_core:6.2f} {naive / r['ms']:8.2f} "
              f"{sdpa / r['ms']:8.1f} {r['peak_bytes'] / r['qkvo_bytes']:9.2f} {r.get('first_call_s', math.nan):7.1f}")


if __name__ == "__main__":
    main()
