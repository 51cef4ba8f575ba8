"""Train a small LongNet (`flexdilated.LongNetLM`) to retrieve a passkey across 8,192 tokens, on CPU.

The task: a 2-digit passkey ``# d0 - d1`` hidden somewhere in the first half of a sequence of random filler words;
in the second half, queries ``?0`` / ``?1`` each followed by the digit they ask for. The loss and the accuracy
count the answer digits only (chance: 10 %). The passkey ends at least one smallest segment before the first query,
in another segment of every pattern but the largest, and the queries of one smallest segment ask different
digits: a model that sees only its smallest segment (or its middle one) cannot beat chance, only the 8,192-token
pattern connects a query to the passkey.

Dilated attention reaches a distant key only at the query's own offset modulo the dilation rate
(``(p % w) % r == (t % w) % r``); a deep LongNet mixes offsets layer by layer, this 2-layer one is given a task
laid out on the grid of the largest pattern (cells of r = 16 tokens): digit j and query ``?j`` both sit at offset
2j of their cell, where head 2j of the 8,192 pattern connects them. The model has no positional encoding
(retrieval by content needs none, and what it learns on short sequences then holds at any length) and is trained
with a length curriculum: 200 steps of 8 sequences of 512 tokens (a needle among fewer tokens is found sooner), then
100 steps of one 8,192-token sequence; the held-out set is 8,192 tokens throughout. Measured on 2 cores: 350 steps
all at 8,192 stayed at chance, and in a trial with RoPE what was learned on 512 tokens did not hold at 8,192.

    python examples/train_lm.py                   # CPU, about 2 minutes on 2 cores: plot, checkpoint in out/
    python examples/train_lm.py --resume          # continue a killed run exactly where its checkpoint left it
    python examples/train_lm.py --device cuda     # bf16 autocast on a GPU (--compile: torch.compile the model)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless here
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flexdilated import LongNetLM  # noqa: E402

try:  # the plot extra
    from matplotlib.figure import Figure  # noqa: E402
    from matplotlib.ticker import PercentFormatter  # noqa: E402
    from tqdm import tqdm  # noqa: E402
except ImportError as e:
    raise ImportError(f"{e.name} is missing: examples/train_lm.py needs pip install flexdilated[plot] (matplotlib, "
                      "tqdm; make demo installs it)") from e

# ------------------------------------------------------------------------------------------------------ the task


@dataclass(frozen=True)
class Passkey:
    """``digits`` random digits written ``# d0 - d1 ...`` at the start of a cell in the first half of ``seq_len + 1``
    random filler words; in the second half, up to one query per cell: ``?j`` at offset 2j, then digit j. Every
    ``near`` tokens (the smallest segment) ask distinct digits."""

    seq_len: int  # tokens the model reads; a sequence has seq_len + 1 tokens (inputs and shifted targets)
    digits: int = 2
    cell: int = 16  # the largest dilation rate
    near: int = 64  # the smallest segment length
    words: int = 64  # filler vocabulary

    # token ids: digits 0-9, filler words, '#', '-', queries ?0 ?1 ...
    @property
    def mark(self) -> int:
        return 10 + self.words

    @property
    def query0(self) -> int:
        return self.mark + 2

    @property
    def vocab(self) -> int:
        return self.query0 + self.digits

    @property
    def query_start(self) -> int:
        return self.seq_len // 2 // self.near * self.near

    def check(self, segment_lengths, dilation_rates, heads: int) -> None:
        w = sorted(segment_lengths)
        if self.seq_len > w[-1]:
            raise ValueError(f"--seq-len {self.seq_len} must be <= the largest segment ({w[-1]})")
        if not 1 <= self.digits <= self.cell // 2 or 2 * self.digits - 1 > heads:
            raise ValueError(f"--digits {self.digits} must be in 1..r/2 (r = {self.cell}) with 2 * digits - 1 <= heads")
        if self.near != w[0] or self.near % self.cell:
            raise ValueError(f"the smallest segment ({w[0]}) must be a multiple of the largest rate ({self.cell})")
        if len(w) > 1 and self.query_start % w[-2] and self.seq_len > 2 * w[-2]:
            raise ValueError(f"--seq-len {self.seq_len}: its half must be a multiple of {w[-2]}")
        if self.query_start < 3 * self.near:
            raise ValueError(f"--seq-len {self.seq_len} is too short for the task (>= {6 * self.near})")

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n sequences (n, seq_len + 1) drawn with ``gen``."""
        c, d = self.cell, self.digits
        tokens = torch.randint(10, 10 + self.words, (n, self.seq_len + 1), generator=gen)
        key = torch.randint(0, 10, (n, d), generator=gen)
        at = torch.randint(1, (self.query_start - self.near) // c, (n, 1), generator=gen) * c  # passkey cell
        tokens.scatter_(1, at - 1, self.mark)
        tokens.scatter_(1, at + 2 * torch.arange(d), key)
        tokens.scatter_(1, at + 2 * torch.arange(d - 1) + 1, self.mark + 1)
        slots = self.near // c  # cells per smallest segment
        per = min(slots, d)  # queries per smallest segment, asking distinct digits in distinct cells
        segments = (self.seq_len + 1 - self.query_start - c) // self.near
        ask = torch.rand(n, segments, d, generator=gen).argsort(-1)[..., :per]
        slot = torch.rand(n, segments, slots, generator=gen).argsort(-1)[..., :per]
        cells = (self.query_start + (torch.arange(segments)[:, None] * slots + slot) * c).reshape(n, -1)
        ask = ask.reshape(n, -1)
        tokens.scatter_(1, cells + 2 * ask, self.query0 + ask)
        tokens.scatter_(1, cells + 2 * ask + 1, key.gather(1, ask))
        return tokens

    def name(self, t: int) -> str:
        if t < 10:
            return str(t)
        if t < self.mark:
            return f"w{t - 10}"
        return "#" if t == self.mark else "-" if t == self.mark + 1 else f"?{t - self.query0}"


def answer_logits(model, tokens: torch.Tensor, task: Passkey, device: str):
    """Logits at the queries (Q, vocab) and their answers (Q,), over the batch."""
    inputs = tokens[:, :-1]
    at = inputs >= task.query0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(inputs)
    return logits[at].float(), tokens[:, 1:][at]


@torch.no_grad()
def evaluate(model, eval_set: torch.Tensor, task: Passkey, device: str) -> tuple[float, float]:
    """(loss, accuracy) over the answers of the held-out set."""
    was_training = model.training
    model.eval()
    loss = correct = count = 0.0
    for tokens in eval_set.split(4):
        logits, answers = answer_logits(model, tokens, task, device)
        loss += F.cross_entropy(logits, answers, reduction="sum").item()
        correct += (logits.argmax(-1) == answers).sum().item()
        count += answers.numel()
    model.train(was_training)
    return loss / count, correct / count


# ------------------------------------------------------------------------------------------------------ the plot

PLOT_INCHES, PLOT_DPI = (10, 4), 100  # the PNG is 1000 x 400 pixels
BLUE, LIGHT, ORANGE, GREY = "#1f77b4", "#aec7e8", "#e66e00", "#969696"


def figure(history: dict, cfg: dict, chance: float):
    """Training answer loss (each step and its mean over 20 steps) and held-out accuracy against the step, as a
    matplotlib Figure; dashed: chance, dotted: where the curriculum changes the sequence length."""
    fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    losses = history["loss"]
    smooth = [(s, sum(v for _, v in losses[max(0, i - 19) : i + 1]) / len(losses[max(0, i - 19) : i + 1]))
              for i, (s, _) in enumerate(losses)]
    marks = [sum(k for _, _, k in cfg["curriculum"][: i + 1]) for i in range(len(cfg["curriculum"]))]
    left.plot(*zip(*losses or [(0, math.nan)]), color=LIGHT, lw=1, label="each step")
    left.plot(*zip(*smooth or [(0, math.nan)]), color=BLUE, lw=2, label="mean over 20 steps")
    left.axhline(math.log(1 / chance), color=GREY, ls="--", lw=1, label=f"chance (ln {round(1 / chance)})")
    left.set(title="answer loss (train)", xlabel="step", ylabel="cross-entropy of the answer digits")
    left.set_ylim(bottom=0)
    acc = [(s, a) for s, _, a in history["eval"]]
    last = "".join(f" ({a:.1%} at step {s})" for s, a in acc[-1:])
    right.plot(*zip(*acc or [(0, math.nan)]), color=ORANGE, lw=2, marker="o", ms=4, label=f"held-out accuracy{last}")
    right.axhline(chance, color=GREY, ls="--", lw=1, label=f"chance ({chance:.0%})")
    right.set(title=f"held-out accuracy, {cfg['seq_len']:,} tokens", xlabel="step", ylabel="answers right",
              ylim=(0, 1.02))
    right.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    lengths = " \u2192 ".join(f"{n:,}" for n in [n for n, _, _ in cfg["curriculum"]] + [cfg["seq_len"]])
    for ax in (left, right):
        ax.set_xlim(0, cfg["steps"])
        ax.grid(True, color="#e8e8e8", lw=0.8)
        for i, m in enumerate(marks):
            ax.axvline(m, color=GREY, ls=":", lw=1.2, label=f"sequence length {lengths} tokens" if i == 0 else None)
    left.legend(loc="upper right", fontsize=8)
    right.legend(loc="lower right", bbox_to_anchor=(1, 0.14), fontsize=8)  # above the chance line
    return fig


def plot(history: dict, cfg: dict, chance: float, path: Path) -> Path:
    """`figure` saved as a PNG."""
    figure(history, cfg, chance).savefig(path)
    return path


# ------------------------------------------------------------------------------------------------------ training


def ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def stages(s: str) -> tuple[tuple[int, int, int], ...]:
    """'512x8:200,2048x2:60' -> ((512, 8, 200), (2048, 2, 60)): length x batch : steps."""
    if not s:
        return ()
    return tuple(tuple(int(v) for v in part.replace("x", ":").split(":")) for part in s.split(","))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (bf16 autocast)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--segment-lengths", type=ints, default=(32, 256, 8192))
    p.add_argument("--dilation-rates", type=ints, default=(1, 4, 16))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=16, help="16 = the largest rate: every offset has a head")
    p.add_argument("--digits", type=int, default=2, help="passkey length")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1, help="sequences of --seq-len per step")
    p.add_argument("--curriculum", type=stages, default=stages("512x8:200"),
                   help="first steps on shorter sequences, 'LENxBATCH:STEPS,...' ('' for none)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-size", type=int, default=16, help="held-out sequences of --seq-len")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--out", default="out/train_lm")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt with its configuration")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step (checkpointed), as if killed")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# the options that define a run: a resumed run takes them from its checkpoint
RUN_KEYS = ("seq_len", "segment_lengths", "dilation_rates", "dim", "depth", "heads", "digits", "steps",
            "batch_size", "curriculum", "lr", "warmup", "seed", "eval_every", "eval_size", "ckpt_every")


def make_task(cfg: dict, seq_len: int) -> Passkey:
    return Passkey(seq_len, cfg["digits"], cell=max(cfg["dilation_rates"]), near=min(cfg["segment_lengths"]))


def build(cfg: dict) -> tuple[LongNetLM, Passkey]:
    """The model (no positional encoding) and the task at ``seq_len``, checked against the spec."""
    task = make_task(cfg, cfg["seq_len"])
    for n in [n for n, _, _ in cfg["curriculum"]] + [cfg["seq_len"]]:
        make_task(cfg, n).check(cfg["segment_lengths"], cfg["dilation_rates"], cfg["heads"])
    model = LongNetLM(task.vocab, cfg["dim"], cfg["depth"], cfg["heads"], cfg["segment_lengths"],
                      cfg["dilation_rates"], position=None)
    return model, task


def stage_at(step: int, cfg: dict) -> tuple[int, int]:
    """(sequence length, batch size) of a step (0-based)."""
    for n, batch, steps in cfg["curriculum"]:
        if step < steps:
            return n, batch
        step -= steps
    return cfg["seq_len"], cfg["batch_size"]


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to 10 % (a function of the step only: resumes exactly)."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


def save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous checkpoint whole


def clock(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, plot_path = out / "ckpt.pt", out / "train_lm.png"
    device = args.device
    cfg = {k: getattr(args, k) for k in RUN_KEYS}
    ckpt = None
    if args.resume:
        if not ckpt_path.exists():
            sys.exit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = ckpt["config"]
    torch.manual_seed(cfg["seed"])
    model, task = build(cfg)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    data = torch.Generator().manual_seed(cfg["seed"])  # training batches; its state is checkpointed
    eval_set = task.batch(cfg["eval_size"], torch.Generator().manual_seed(cfg["seed"] + 1_000_003)).to(device)
    history = {"loss": [], "eval": []}  # loss: (step, train loss); eval: (step, loss, accuracy)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        data.set_state(ckpt["data_rng"])
        step, history = ckpt["step"], ckpt["history"]
        print(f"resumed from {ckpt_path} at step {step}, with its configuration")
    run = torch.compile(model) if args.compile else model
    chance = 1 / 10

    def checkpoint() -> None:
        save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "torch_rng": torch.get_rng_state(), "data_rng": data.get_state(), "history": history,
                         "config": cfg})

    params = sum(p.numel() for p in model.parameters())
    print(f"LongNetLM dim={cfg['dim']} depth={cfg['depth']} heads={cfg['heads']} ({params:,} parameters, no positional "
          f"encoding), segments {cfg['segment_lengths']}, dilations {cfg['dilation_rates']}, {device}")
    print(f"task: a {task.digits}-digit passkey in tokens 16-{task.query_start - task.near:,}, queried "
          f"{(task.seq_len - task.query_start) // task.near * min(task.digits, task.near // task.cell)} times in "
          f"tokens {task.query_start:,}-{task.seq_len:,} (N = {task.seq_len:,}); chance {chance:.0%} per answer, "
          f"loss ln 10 = {math.log(10):.3f}")
    plan = " then ".join(f"{s} steps of {b} x {n:,}" for n, b, s in cfg["curriculum"])
    print(f"training: {plan + ' then ' if plan else ''}{cfg['batch_size']} x {cfg['seq_len']:,} tokens up to step "
          f"{cfg['steps']}; held-out: {cfg['eval_size']} sequences of {cfg['seq_len']:,}")
    steps, start_step, t0 = cfg["steps"], step, time.perf_counter()
    stop = steps if args.stop_after is None else min(steps, args.stop_after)
    # the bar counts tokens (steps differ in length): tok/s, and an ETA from the tokens left
    bar = tqdm(total=sum(math.prod(stage_at(s, cfg)) for s in range(step, stop)), unit="tok", unit_scale=True,
               smoothing=0, dynamic_ncols=True, disable=args.quiet, desc=f"step {step:>4}/{steps}")

    def held_out() -> None:
        history["eval"].append((step, *evaluate(run, eval_set, task, device)))
        if not args.quiet:
            _, ev_loss, acc = history["eval"][-1]
            bar.write(f"step {step:>4}/{steps}  held-out ({cfg['eval_size']} x {task.seq_len:,}): loss {ev_loss:.3f}  "
                      f"accuracy {acc:.1%} (chance {chance:.0%})")

    if step == 0 and stop > 0:
        held_out()  # the untrained model, where the accuracy curve starts
    while step < stop:
        n, b = stage_at(step, cfg)
        stage = make_task(cfg, n)
        batch = stage.batch(b, data).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits, answers = answer_logits(run, batch, stage, device)
        loss = F.cross_entropy(logits, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history["loss"].append((step, loss.item()))
        bar.set_description(f"step {step:>4}/{steps}", refresh=False)
        bar.set_postfix_str(f"{b} x {n:,} loss {loss.item():.3f}", refresh=False)
        bar.update(n * b)
        if step % cfg["eval_every"] == 0 or step == steps:
            held_out()
        if step % cfg["ckpt_every"] == 0 or step == stop:
            checkpoint()
    bar.close()
    elapsed = time.perf_counter() - t0
    plot(history, cfg, chance, plot_path)
    final = history["eval"][-1] if history["eval"] else None
    if step < steps:
        print(f"stopped after step {step} of {steps} ({clock(elapsed)}): continue with --resume --out {out}")
    elif final is not None:
        print(f"final held-out accuracy {final[2]:.1%} (chance {chance:.0%}), loss {final[1]:.3f} (chance "
              f"{math.log(10):.3f}), {steps - start_step} steps in {clock(elapsed)}")
    print(f"plot: {plot_path}\ncheckpoint: {ckpt_path} (step {step})")
    return {"history": history, "step": step, "chance": chance, "accuracy": final[2] if final else None,
            "plot": plot_path, "checkpoint": ckpt_path, "model": model, "task": task, "seconds": elapsed}


if __name__ == "__main__":
    main()
