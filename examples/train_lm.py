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
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: harmless here
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flexdilated import LongNetLM  # noqa: E402

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
# a 3x5 pixel font (rows top-down, 3 bits a row) for the labels; lines drawn into an RGB byte buffer, saved as PNG

FONT = dict(zip("0123456789.%:()-, abcdefghiklmnoprstuvwxy", (
    "75557 26227 71747 71317 55711 74717 74757 71122 75757 75717 00002 51245 02020 12221 42224 00700 00024 00000 "
    "07177 44757 07447 17557 75747 34644 07571 44755 20222 45655 62227 07775 06555 07557 07574 07444 07617 27223 "
    "05557 05552 05575 05255 05571"
).split()))
PLOT_W, PLOT_H = 800, 320
BLUE, LIGHT, ORANGE, GREY, BLACK = (31, 119, 180), (174, 199, 232), (230, 110, 0), (150, 150, 150), (40, 40, 40)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h, self.px = width, height, bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: float, y: float, colour, size: int = 1) -> None:
        x0, y0 = int(round(x)), int(round(y))
        for yy in range(max(y0, 0), min(y0 + size, self.h)):
            for xx in range(max(x0, 0), min(x0 + size, self.w)):
                self.px[(yy * self.w + xx) * 3 : (yy * self.w + xx) * 3 + 3] = bytes(colour)

    def line(self, x0, y0, x1, y1, colour, size: int = 1, dash: int = 0) -> None:
        n = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        for i in range(n + 1):
            if not dash or (i // dash) % 2 == 0:
                self.dot(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, colour, size)

    def text(self, x: float, y: float, s: str, colour=BLACK, scale: int = 2) -> None:
        for k, ch in enumerate(s.lower()):
            for row, bits in enumerate(FONT.get(ch, "00000")):
                for col in range(3):
                    if int(bits) >> (2 - col) & 1:
                        self.dot(x + (4 * k + col) * scale, y + row * scale, colour, scale)

    def png(self, path: Path) -> Path:
        raw = b"".join(b"\x00" + self.px[y * self.w * 3 : (y + 1) * self.w * 3] for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        png = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b"")
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
        return path


def panel(c: Canvas, box, title: str, xmax: int, ymax: float, curves, hline: float, fmt: str, marks=()) -> None:
    """Axes in ``box`` (x0, y0, x1, y1) with ``curves`` [(points [(x, y)], colour)], a dashed line at ``hline`` and
    dotted vertical lines at the steps ``marks``."""
    x0, y0, x1, y1 = box
    X = lambda x: x0 + (x1 - x0) * x / max(xmax, 1)  # noqa: E731
    Y = lambda y: y1 - (y1 - y0) * min(max(y / ymax, 0.0), 1.0)  # noqa: E731
    for frac in (0.25, 0.5, 0.75, 1.0):
        c.line(x0, Y(frac * ymax), x1, Y(frac * ymax), (232, 232, 232))
        c.text(x0 - 8 - 8 * len(fmt.format(frac * ymax)), Y(frac * ymax) - 5, fmt.format(frac * ymax))
    c.text(x0 - 16, y1 - 5, "0")
    for m in marks:
        c.line(X(m), y0, X(m), y1, GREY, 1, dash=2)
    c.line(x0, y1, x1, y1, BLACK), c.line(x0, y0, x0, y1, BLACK)
    c.line(x0, Y(hline), x1, Y(hline), GREY, 1, dash=6)
    for points, colour in curves:
        for (a, b), (p, q) in zip(points, points[1:]):
            c.line(X(a), Y(b), X(p), Y(q), colour, 2)
    for m in marks:
        c.text(X(m) - 4 * len(str(m)), y1 + 8, str(m), GREY)
    c.text(x1 - 8 * len(str(xmax)) + 8, y1 + 8, str(xmax)), c.text(x0 + 8, y1 + 8, "step")
    c.text(x0 + 4, y0 - 24, title)


def plot(history: dict, cfg: dict, chance: float, path: Path) -> Path:
    """Training answer loss (each step and its mean over 20 steps) and held-out accuracy against the step, as a
    PNG; dotted lines where the curriculum changes the sequence length."""
    c = Canvas(PLOT_W, PLOT_H)
    losses = history["loss"]
    smooth = [(s, sum(v for _, v in losses[max(0, i - 19) : i + 1]) / len(losses[max(0, i - 19) : i + 1]))
              for i, (s, _) in enumerate(losses)]
    ymax = 2 * math.ceil(max([v for _, v in losses], default=2.0) / 2)
    marks = [sum(k for _, _, k in cfg["curriculum"][: i + 1]) for i in range(len(cfg["curriculum"]))]
    steps = cfg["steps"]
    panel(c, (60, 40, 380, 270), "answer loss (train)", steps, ymax, [(losses, LIGHT), (smooth, BLUE)],
          math.log(1 / chance), "{:g}", marks)
    plan = [f"{n} tokens until step {m}" for (n, _, _), m in zip(cfg["curriculum"], marks)]
    c.text(60, 292, ", ".join(plan + [f"then {cfg['seq_len']}" if plan else f"{cfg['seq_len']} tokens"]), GREY)
    acc = [(s, a) for s, _, a in history["eval"]]
    panel(c, (480, 40, 780, 270), f"held-out accuracy, {cfg['seq_len']} tokens", steps, 1.0, [(acc, ORANGE)], chance,
          "{:.0%}", marks)
    for s, a in acc[-1:]:
        c.text(480, 292, f"{a:.1%} at step {s}, chance {chance:.0%} (dashed)", ORANGE)
    return c.png(path)


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
    steps, start_step, t0, tokens_seen = cfg["steps"], step, time.perf_counter(), 0
    stop = steps if args.stop_after is None else min(steps, args.stop_after)

    def held_out() -> None:
        history["eval"].append((step, *evaluate(run, eval_set, task, device)))
        if not args.quiet:
            _, ev_loss, acc = history["eval"][-1]
            print(f"\rstep {step:>4}/{steps}  held-out ({cfg['eval_size']} x {task.seq_len:,}): loss {ev_loss:.3f}  "
                  f"accuracy {acc:.1%} (chance {chance:.0%}){' ' * 12}", flush=True)

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
        tokens_seen += n * b
        history["loss"].append((step, loss.item()))
        elapsed = time.perf_counter() - t0
        if not args.quiet:
            eta = sum(math.prod(stage_at(s, cfg)) for s in range(step, stop)) / (tokens_seen / elapsed)
            print(f"\rstep {step:>4}/{steps}  {b} x {n:<5,} loss {loss.item():.3f}  {tokens_seen / elapsed:,.0f} "
                  f"tok/s  {clock(elapsed)} ETA {clock(eta)} ", end="", flush=True)
        if step % cfg["eval_every"] == 0 or step == steps:
            held_out()
        if step % cfg["ckpt_every"] == 0 or step == stop:
            checkpoint()
    elapsed = time.perf_counter() - t0
    if not args.quiet and step > start_step:
        print()
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
