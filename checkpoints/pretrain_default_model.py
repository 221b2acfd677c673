"""Pretrains the tiny default model (checkpoints/default/) on a synthetic corpus.

The corpus is ``loqjax.tasks.PRETRAIN_TASKS`` (copy, lower, count) with random content:
the same ``"<task>: <input> => <answer>"`` format and alphabet as the demo's fine-tuning
tasks, none of their mappings. The base thus reads the format and every character but
cannot upper-case, reverse or add until an adapter learns to. Needs the test extra
(torch); deterministic (one CPU thread, fixed seeds): rerunning reproduces the files.

    python checkpoints/pretrain_default_model.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from make_default_model import DEFAULT_DIR, build_model, build_tokenizer

from loqjax.tasks import PRETRAIN_TASKS, make_record


def corpus_batch(tokenizer, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, ...]:
    """(ids, labels) int64 [batch, L]: one "<s>prompt completion" line per row, padding
    labelled -100 so it is not scored."""
    tasks = list(PRETRAIN_TASKS)
    lines = []
    for _ in range(batch):
        record = make_record(tasks[int(rng.integers(len(tasks)))], rng)
        lines.append(tokenizer(record["prompt"] + record["completion"])["input_ids"])
    width = max(map(len, lines))
    ids = torch.full((batch, width), tokenizer.pad_token_id)
    labels = torch.full((batch, width), -100)
    for row, line in enumerate(lines):
        ids[row, : len(line)] = torch.tensor(line)
        labels[row, : len(line)] = torch.tensor(line)
    return ids, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=args.steps)
    for step in range(args.steps):
        ids, labels = corpus_batch(tokenizer, rng, batch=64)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
