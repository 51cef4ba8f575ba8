"""flexdilated demo: dilated attention over a 65,536-token sequence on this machine.

1. runs `dilated_attention` on N = 65,536 (B=1, H=8, D=64, LongNet's w=(2048, 4096, 8192), r=(1, 2, 4));
2. checks the last 512 rows against `reference_dilated_attention` (dense, exact) on the same inputs;
3. times dense SDPA at N = 16,384 and extrapolates it by N^2 to 65,536 (labelled as such);
4. saves the pattern picture of a scaled-down spec to out/dilated_mask.png.
"""

import argparse
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless here
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flexdilated import DilatedSpec, dilated_attention, dilated_mask, plot_mask  # noqa: E402
from flexdilated.reference import reference_rows  # noqa: E402


def timed(fn, device):
    if device == "cuda":
        fn()  # warm-up: compiles the kernels
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    device, N = args.device, args.seq_len
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    spec = DilatedSpec((2048, 4096, 8192), (1, 2, 4))
    q, k, v = (torch.randn(1, 8, N, 64, device=device, dtype=dtype) for _ in range(3))
    print(f"device {device}, {dtype}, B=1 H=8 D=64, N={N:,}, {spec}")

    with torch.no_grad():
        out, t_dilated = timed(lambda: dilated_attention(q, k, v, spec), device)
        print(f"dilated_attention         N={N:>7,}: {t_dilated * 1e3:9.1f} ms")

        rows = torch.arange(N - 512, N, device=device)
        ref, _ = reference_rows(q[:, :, rows].double(), k.double(), v.double(), spec, rows)
        err = ((out[:, :, rows].double() - ref).norm() / ref.norm()).item()
        print(f"check vs reference, last 512 rows: relative error {err:.2e}")
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err

        M = min(N, 16384)
        qs, ks, vs = (x[:, :, :M] for x in (q, k, v))
        _, t_dense = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs), device)
        print(f"dense SDPA                N={M:>7,}: {t_dense * 1e3:9.1f} ms (measured)")
        t_dense_n = t_dense * (N / M) ** 2
        print(f"dense SDPA                N={N:>7,}: {t_dense_n * 1e3:9.1f} ms (N^2 extrapolation, not measured)")
        print(f"speed-up over dense attention at N={N:,}: {t_dense_n / t_dilated:.1f}x (against the extrapolation)")

    Path(args.out).mkdir(exist_ok=True)
    small = DilatedSpec((16, 32, 64), (1, 2, 4))
    path = Path(args.out) / "dilated_mask.png"
    plot_mask(dilated_mask(small, num_heads=4, seq_len=64), path)
    print(f"pattern of {small} for heads 0-3, N=64: {path}")


if __name__ == "__main__":
    main()
