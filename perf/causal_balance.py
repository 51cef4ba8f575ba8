"""Causal load balance of sequence parallelism, counted from the mask definition (no attention is run).

    PYTHONPATH=$PWD python3 perf/causal_balance.py

A rank computes the rows of its own queries (`distributed.py`: spanning patterns bring the keys to the queries),
so its work is the number of attended (query, key) pairs of its queries, summed over patterns and heads (multiset:
each pattern is its own attention). Under pattern (w, r) head h with offset o, the query at position a of its
segment (a % r == o) attends the keys t <= a of its class: (a - o) // r + 1 of them. This script sums that in
closed form per rank (exact integers, any N), checks the closed form against `flexdilated.reference.multiplicity`
on small sizes, and prints max / mean over the ranks.
"""

from __future__ import annotations

import torch

from flexdilated import DilatedSpec
from flexdilated.reference import multiplicity
from flexdilated.spec import head_offsets


def _class_pairs(lo: int, hi: int, o: int, r: int) -> int:
    """Σ ((a - o) // r + 1) over a in [lo, hi) with a % r == o: the pairs of those queries (keys t <= a)."""
    first = lo + (o - lo) % r  # the first a >= lo of offset o
    if first >= hi:
        return 0
    m0, m1 = (first - o) // r + 1, (hi - 1 - o) // r + 1  # key counts of the first and last such query
    return (m0 + m1) * (m1 - m0 + 1) // 2


def pairs_per_rank(spec: DilatedSpec, H: int, N: int, P: int) -> list[int]:
    """Attended (query, key) pairs of each rank's queries (causal), n = N / P tokens per rank."""
    n = N // P
    out = []
    for rank in range(P):
        total = 0
        for (w, r), offsets in zip(spec.patterns, head_offsets(spec, H)):
            w = min(w, N)
            for o in offsets:
                if o is None:
                    continue
                if n % w == 0:  # local: n / w whole segments
                    total += (n // w) * _class_pairs(0, w, o, r)
                else:  # spanning: this rank is shard j of its segment
                    j = rank % (w // n)
                    total += _class_pairs(j * n, (j + 1) * n, o, r)
        out.append(total)
    return out


def check_closed_form() -> None:
    for segments, rates in (((8, 16, 32), (1, 2, 4)), ((16, 64), (3, 5))):
        spec = DilatedSpec(segments, rates, causal=True)
        for P in (1, 2, 4):
            N, H = 64, 4
            n = N // P
            pos = torch.arange(N)
            m = multiplicity(spec, H, pos, pos)  # (H, N, N), causal
            dense = [int(m[:, rho * n : rho * n + n].sum()) for rho in range(P)]
            assert dense == pairs_per_rank(spec, H, N, P), (spec, P, dense, pairs_per_rank(spec, H, N, P))


def zigzag(spec: DilatedSpec, H: int, N: int, P: int) -> list[int]:
    """The same counts if each rank held two half-shards, ρ and 2P - 1 - ρ (zigzag, as in context parallelism):
    computed from per-half-shard counts of a 2P-way split (valid where each pattern is local or spans halves)."""
    halves = pairs_per_rank(spec, H, N, 2 * P)
    return [halves[rho] + halves[2 * P - 1 - rho] for rho in range(P)]


def main() -> None:
    check_closed_form()
    print("closed form = flexdilated.reference.multiplicity on small sizes: ok\n")
    W1 = ((2048, 4096, 8192), (1, 2, 4))
    PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
    N1B = 2**30
    rows = [
        ("W1", W1, 8, 2**20, (1, 2, 4, 8)),
        ("W1", W1, 8, 2**16, (2, 8, 32)),  # n = 32768 .. 2048: the 8192 pattern spans up to 4 ranks
        ("W1 + (N, N/16384)", (W1[0] + (None,), W1[1] + (None,)), 8, 2**20, (2, 8, 64)),
        ("W1 + (N, N/16384)", (W1[0] + (None,), W1[1] + (None,)), 8, N1B, (128,)),
        ("paper", PAPER, 12, N1B, (128, 256)),
        ("paper + (N, N/2048)", (PAPER[0] + (None,), PAPER[1] + (None,)), 12, N1B, (128, 256)),
        ("paper + (N, N/2048)", (PAPER[0] + (None,), PAPER[1] + (None,)), 12, 2**20, (8, 32)),
    ]
    print(f"{'causal spec':22s} {'H':>3s} {'N':>14s} {'P':>4s} {'n/rank':>10s} {'spanning':>8s} {'max/mean':>9s} "
          f"{'max/min':>8s} {'zigzag max/mean':>15s}")
    for name, (segments, rates), H, N, worlds in rows:
        keys = 16384 if name.startswith("W1") else 2048  # keys per head class of the whole-sequence pattern
        segs = tuple(N if w is None else w for w in segments)
        rts = tuple(N // keys if r is None else r for r in rates)
        spec = DilatedSpec(segs, rts, causal=True)
        for P in worlds:
            n = N // P
            counts = pairs_per_rank(spec, H, N, P)
            spanning = sum(1 for w, _ in spec.patterns if n % min(w, N))
            mean = sum(counts) / P
            zz = zigzag(spec, H, N, P) if all((N // (2 * P)) % min(w, N) == 0 or min(w, N) % (N // (2 * P)) == 0
                                              for w, _ in spec.patterns) else None
            zz_s = f"{max(zz) / (sum(zz) / P):15.3f}" if zz else f"{'-':>15s}"
            print(f"{name:22s} {H:3d} {N:>14,d} {P:4d} {n:>10,d} {spanning:8d} {max(counts) / mean:9.3f} "
                  f"{max(counts) / max(min(counts), 1):8.3f} {zz_s}")


if __name__ == "__main__":
    main()
