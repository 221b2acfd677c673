"""Synthetic text tasks with checkable answers, for the demo and the default model.

Every record is ``{"prompt": "<task>: <input> =>", "completion": " <answer>"}``; a model
solves a prompt when its greedy continuation, up to the newline, equals the completion.
``FINE_TUNE_TASKS`` are what adapters learn (the demo's: upper, swapcase); ``PRETRAIN_TASKS``
share their format and alphabet but not their mappings, so the pretrained base knows the
format and every character yet answers the fine-tuning tasks wrongly (swapcase flips every
letter's case, so the base's copy is never right).

    python -m loqjax.tasks [--out DIR]   # rewrites the bundled loqjax/data/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
END = "\n"  # every completion ends with it; generation stops there


def _word(rng: np.random.Generator, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(3, 7))))


def _upper(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng)
    return word, word.upper()


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng)
    return word, word[::-1]


def _swapcase(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng, string.ascii_letters)
    return word, word.swapcase()


def _add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    return f"{a}+{b}", str(a + b)


def _copy(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng, string.ascii_letters)
    return word, word


def _lower(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng, string.ascii_uppercase)
    return word, word.lower()


def _count(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng, string.ascii_letters + string.digits)
    return word, str(len(word))


Task = Callable[[np.random.Generator], tuple[str, str]]
# Dict order fixes each dataset's seed (its index); append new tasks to keep the others.
FINE_TUNE_TASKS: dict[str, Task] = {
    "upper": _upper,
    "reverse": _reverse,
    "add": _add,
    "swapcase": _swapcase,
}
PRETRAIN_TASKS: dict[str, Task] = {"copy": _copy, "lower": _lower, "count": _count}


def make_record(task: str, rng: np.random.Generator) -> dict[str, str]:
    """One ``{"prompt", "completion"}`` record of ``task`` (a key of either task table)."""
    source, answer = {**FINE_TUNE_TASKS, **PRETRAIN_TASKS}[task](rng)
    return {"prompt": f"{task}: {source} =>", "completion": f" {answer}{END}"}


def make_records(task: str, num: int, seed: int) -> list[dict[str, str]]:
    """``num`` distinct records of ``task``, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    records: dict[str, dict[str, str]] = {}
    while len(records) < num:
        record = make_record(task, rng)
        records.setdefault(record["prompt"], record)
    return list(records.values())


def write_datasets(out: Path = DATA_DIR, num: int = 600) -> list[Path]:
    """Writes ``<task>.jsonl`` for every fine-tuning task (seed = its index)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, task in enumerate(FINE_TUNE_TASKS):
        path = out / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_records(task, num, seed)))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the bundled task datasets.")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    for path in write_datasets(parser.parse_args().out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
