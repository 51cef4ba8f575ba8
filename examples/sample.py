"""Ask a model trained by train_lm.py for its passkeys: greedy generation with the KV cache (`LongNetLM.generate`).

Each prompt is a fresh sequence of the training task: the passkey somewhere in its first half, filler words after
it (no earlier queries), and one query ``?j`` near the end of the sequence; the model generates what follows it.

    python examples/sample.py                     # the checkpoint of `make demo`: out/train_lm/ckpt.pt
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/train_lm/ckpt.pt")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=3, help="the answer digit, then filler (unpredictable)")
    p.add_argument("--seed", type=int, default=1234, help="prompts: not the training or the held-out sequences")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    model, task = train_lm.build(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(args.device).eval()
    print(f"{args.ckpt}: step {ckpt['step']}, N = {task.seq_len:,}, a {task.digits}-digit passkey")
    gen = torch.Generator().manual_seed(args.seed)
    haystack = task.batch(args.prompts, gen)
    after = (args.prompts, task.seq_len + 1 - task.query_start)  # filler only after the passkey: no earlier queries
    haystack[:, task.query_start :] = torch.randint(10, 10 + task.words, after, generator=gen)
    at = (haystack == task.mark).float().argmax(1) + 1  # where each passkey starts
    key = torch.stack([haystack[i, at[i] : at[i] + 2 * task.digits : 2] for i in range(args.prompts)])
    cell = task.seq_len - task.cell  # the last whole cell before the end
    outputs, got = [], torch.zeros_like(key)
    start = time.perf_counter()
    for j in range(task.digits):
        prompt = haystack[:, : cell + 2 * j + 1].clone()
        prompt[:, -1] = task.query0 + j  # ... ?j
        out = model.generate(prompt.to(args.device), args.max_new_tokens, temperature=0).cpu()
        outputs.append((prompt, out))
        got[:, j] = out[:, prompt.shape[1]]
    seconds = time.perf_counter() - start
    for i in range(args.prompts):
        names = lambda ts: " ".join(task.name(int(t)) for t in ts)  # noqa: E731
        tail = " | ".join(names(out[i, prompt.shape[1] :]) for prompt, out in outputs)
        passkey = names(haystack[i, at[i] - 1 : at[i] + 2 * task.digits - 1])
        print(f"prompt {i}: passkey '{passkey}' at token {int(at[i]):,}, "
              f"queries ?0..?{task.digits - 1} at {cell:,}+2j ({cell - int(at[i]):,} tokens later): expected "
              f"{names(key[i])}, generated {names(got[i])} {'ok' if torch.equal(key[i], got[i]) else 'WRONG'}   "
              f"(continuations: {tail})")
    accuracy = (got == key).float().mean().item()
    lengths = f"{outputs[0][0].shape[1]:,}" + (f"-{outputs[-1][0].shape[1]:,}" if len(outputs) > 1 else "")
    print(f"accuracy {accuracy:.1%} over {key.numel()} answers (chance 10%); {len(outputs)} generate calls "
          f"({args.prompts} prompts of {lengths} tokens each, {args.max_new_tokens} new tokens) in {seconds:.1f} s")
    return {"outputs": outputs, "expected": key, "generated": got, "accuracy": accuracy, "model": model, "task": task}


if __name__ == "__main__":
    main()
