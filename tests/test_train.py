"""examples/train_lm.py and examples/sample.py on a tiny configuration: exact resume, the plot, generation."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

mpl_image = pytest.importorskip("matplotlib.image")  # examples/train_lm.py needs the plot extra

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
    pixels = mpl_image.imread(a["plot"])
    width, height = (round(inches * train_lm.PLOT_DPI) for inches in train_lm.PLOT_INCHES)
    assert pixels.shape[:2] == (height, width) and pixels.shape[2] in (3, 4)
    assert 0.5 < pixels[..., :3].mean() < 1.0  # mostly white, not blank


def test_plot_draws_the_history(runs):
    a, _, _ = runs
    train_lm = load("train_lm")
    cfg = torch.load(a["checkpoint"], weights_only=False)["config"]
    fig = train_lm.figure(a["history"], cfg, a["chance"])
    loss, accuracy = fig.axes
    assert loss.get_title() == "answer loss (train)" and loss.get_xlabel() == "step"
    assert accuracy.get_title() == "held-out accuracy, 512 tokens"
    each, smooth = loss.lines[:2]
    assert list(each.get_xdata()) == [s for s, _ in a["history"]["loss"]] == list(range(1, 7))
    assert list(each.get_ydata()) == [v for _, v in a["history"]["loss"]]
    assert smooth.get_ydata()[-1] == pytest.approx(sum(v for _, v in a["history"]["loss"]) / 6)
    curve = accuracy.lines[0]
    assert list(curve.get_xdata()) == [0, 3, 6] and list(curve.get_ydata()) == [acc for _, _, acc in a["history"]["eval"]]
    assert curve.get_label() == f"held-out accuracy ({a['accuracy']:.1%} at step 6)"

    def straight(ax, style):  # (x0, x1, y0, y1) of the straight lines drawn in this style
        return [(*line.get_xdata(), *line.get_ydata()) for line in ax.lines if line.get_linestyle() == style]

    assert straight(loss, "--") == [(0, 1, pytest.approx(math.log(10)), pytest.approx(math.log(10)))]  # chance
    assert straight(accuracy, "--") == [(0, 1, 0.1, 0.1)]
    for ax in fig.axes:  # the curriculum (256 x 2 for 2 steps) ends at step 2
        assert straight(ax, ":") == [(2, 2, 0, 1)]
        assert "sequence length 256 \u2192 512 tokens" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_progress_bar_and_held_out_lines(tmp_path, capsys):
    train_lm = load("train_lm")
    loud = [arg for arg in TINY if arg != "--quiet"]
    train_lm.main(loud + ["--steps", "2", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "step    0/2  held-out (2 x 512)" in out and "step    2/2  held-out (2 x 512)" in out
    assert "step    2/2: 100%" in err and "tok/s" in err and "2 x 256 loss" in err  # tqdm's bar, on stderr
    train_lm.main(TINY + ["--steps", "2", "--out", str(tmp_path / "quiet")])
    out, err = capsys.readouterr()
    assert "held-out (2 x 512)" not in out and "tok/s" not in err and "final held-out accuracy" in out


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
