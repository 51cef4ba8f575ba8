"""examples/train_lm.py and examples/sample.py on a tiny configuration: exact resume, the plot, generation."""

import importlib.util
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--seq-len", "512", "--segment-lengths", "32,128,512", "--dilation-rates", "1,4,16", "--dim", "16",
        "--heads", "4", "--curriculum", "256x2:2", "--steps", "6", "--eval-every", "3", "--eval-size", "2",
        "--ckpt-every", "2", "--quiet"]


def load(name: str):
    if name not in sys.modules:  # sample.py imports train_lm: one module object for both
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    train_lm = load("train_lm")
    whole, broken = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("broken")
    a = train_lm.main(TINY + ["--out", str(whole)])
    stopped = train_lm.main(TINY + ["--out", str(broken), "--stop-after", "3"])
    b = train_lm.main(["--out", str(broken), "--resume", "--quiet"])  # the configuration comes from the checkpoint
    return a, stopped, b


def test_resume_reproduces_the_unbroken_run_exactly(runs):
    a, stopped, b = runs
    assert stopped["step"] == 3 and len(stopped["history"]["loss"]) == 3
    assert a["step"] == b["step"] == 6
    assert [loss for _, loss in a["history"]["loss"]] == [loss for _, loss in b["history"]["loss"]]  # bitwise
    assert a["history"]["eval"] == b["history"]["eval"]
    state_a = torch.load(a["checkpoint"], weights_only=False)
    state_b = torch.load(b["checkpoint"], weights_only=False)
    assert state_a["model"].keys() == state_b["model"].keys()
    for name, tensor in state_a["model"].items():
        assert torch.equal(tensor, state_b["model"][name]), name
    assert torch.equal(state_a["data_rng"], state_b["data_rng"])


def test_plot_is_a_png_of_the_expected_size(runs):
    a, _, _ = runs
    train_lm = load("train_lm")
    data = Path(a["plot"]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, colour) == (train_lm.PLOT_W, train_lm.PLOT_H, 8, 2)
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    idat_len, idat = struct.unpack(">I4s", data[33:41])
    assert idat == b"IDAT" and len(zlib.decompress(data[41 : 41 + idat_len])) == height * (1 + 3 * width)
    assert data[-12:] == struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_sample_generates_with_the_kv_cache(runs):
    a, _, _ = runs
    sample = load("sample")
    result = sample.main(["--ckpt", str(a["checkpoint"]), "--prompts", "2", "--max-new-tokens", "3"])
    model, task = result["model"], result["task"]
    assert len(result["outputs"]) == task.digits
    for j, (prompt, out) in enumerate(result["outputs"]):
        assert prompt.shape[0] == 2 and prompt[0, -1] == task.query0 + j
        assert out.shape == (2, prompt.shape[1] + 3) and torch.equal(out[:, : prompt.shape[1]], prompt)
        with torch.no_grad():
            first = model(prompt)[:, -1].argmax(-1)
        assert torch.equal(out[:, prompt.shape[1]], first)
    assert result["generated"].shape == result["expected"].shape == (2, task.digits)
