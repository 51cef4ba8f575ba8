"""The README's Python blocks run as written, in order in one namespace (what a reader pasting them gets), on CPU,
and what their comments claim holds. The blocks for Hugging Face (a model config elided) and for DTensor (under
torchrun on GPUs) are excerpts and are left out; `test_hf.py` and `test_distributed.py` run the same calls."""

import re
import warnings
from pathlib import Path

import torch

from flexdilated import MultiheadDilatedAttention, reference_dilated_attention

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_as_written():
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    quickstart, documents, layers = [b for b in blocks if "transformers" not in b and "torch.distributed" not in b]
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reader pasting them sees no warning
        exec(compile(quickstart, "README quickstart", "exec"), scope)
        assert (scope["out"] - scope["ref"]).abs().max() < 1e-6  # "< 1e-6 in float32"
        exec(compile(documents, "README packed documents", "exec"), scope)
        exec(compile(layers, "README PyTorch layers", "exec"), scope)
    q, k, v, spec, packed = (scope[n] for n in ("q", "k", "v", "spec", "out"))
    for start, end in ((0, 300), (300, 800), (800, 1000)):  # "each document exactly as if alone"
        alone = reference_dilated_attention(*(x[:, :, start:end] for x in (q, k, v)), spec)
        assert (packed[:, :, start:end] - alone).abs().max() < 1e-5
    assert torch.isfinite(scope["loss"])
    assert all(isinstance(layer.self_attn, MultiheadDilatedAttention) for layer in scope["model"].layers)
