"""Fine-tuning jobs: an adapter configuration, a prompt/completion dataset and a schedule.

A dataset is a JSONL file (or a list) of ``{"prompt": str, "completion": str}`` records,
or of pre-tokenized ``{"token_ids": [int, ...], "prompt_len": int}`` records (the loss on
the ids from ``prompt_len`` on; ``prompt_len`` defaults to 0). Text records train on
``<bos> prompt completion`` with the loss on completion tokens only. A deterministic
shuffle puts ``eval_fraction`` of the records aside for eval loss and exact-match accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from loqjax.adapter import DuplicateAdapterError, LoraAdapter
from loqjax.lora import TARGET_MODULES
from loqjax.model import CausalLM
from loqjax.unified import TrainSequence


class DatasetError(ValueError):
    """A dataset file or record is malformed."""


class DuplicateJobError(DuplicateAdapterError):
    """A fine-tuning job for that adapter is already running."""


@dataclasses.dataclass(frozen=True)
class Record:
    prompt: str
    completion: str


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """A pre-tokenized record: the ids of prompt and completion, scored from
    ``prompt_len`` on."""

    token_ids: tuple[int, ...]
    prompt_len: int = 0


def load_records(source: str | os.PathLike | Sequence[dict]) -> list[Record | TokenRecord]:
    """Records from a JSONL path or a list of dicts.

    Raises:
      DatasetError: an unreadable or non-UTF-8 file, a source of another type, invalid
        JSON, a record that is not an object, a missing or non-string
        ``prompt``/``completion``, ``token_ids`` that are not a non-empty list of ids >= 0,
        a ``prompt_len`` outside [0, len(token_ids)) (each naming the file and line), or
        no records.
    """
    if isinstance(source, str | os.PathLike):
        where = str(source)
        try:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"cannot read dataset {where}: {error}") from error
        rows = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append((f"{where}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{where}:{number}: invalid JSON: {error}") from error
    elif isinstance(source, Sequence):
        where = "dataset"
        rows = [(f"record {i}", row) for i, row in enumerate(source)]
    else:
        raise DatasetError(
            f"a dataset is a JSONL path or a list of records, got {type(source).__name__}"
        )
    records = []
    for place, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{place}: expected a JSON object, got {type(row).__name__}")
        if "token_ids" in row:
            records.append(_token_record(place, row))
            continue
        missing = [k for k in ("prompt", "completion") if not _is_text(row.get(k))]
        if missing:
            raise DatasetError(
                f"{place}: missing or non-string field(s) {missing}; every record needs "
                '"prompt" and "completion" strings (valid Unicode)'
            )
        records.append(Record(row["prompt"], row["completion"]))
    if not records:
        raise DatasetError(f"{where} has no records")
    return records


def _token_record(place: str, row: dict) -> TokenRecord:
    ids, prompt_len = row["token_ids"], row.get("prompt_len", 0)
    if not (isinstance(ids, list) and ids and all(_is_index(i) for i in ids)):
        raise DatasetError(f"{place}: token_ids must be a non-empty list of integers in [0, 2**31)")
    if not (_is_index(prompt_len) and prompt_len < len(ids)):
        raise DatasetError(
            f"{place}: prompt_len must be an integer in [0, {len(ids)}), got {prompt_len!r}"
        )
    return TokenRecord(tuple(ids), prompt_len)


def _is_index(value) -> bool:
    """An int32 index: token ids and lengths are int32 on the device."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _is_text(value) -> bool:
    """A str a tokenizer can encode: no lone surrogates."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A new adapter: rank, alpha, target projections, init seed (A random, B zero)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = tuple(TARGET_MODULES)
    seed: int = 0

    def init_adapter(self, model: CausalLM) -> LoraAdapter:
        """PEFT's init: A ~ U(+-1/sqrt(d_in)), B = 0, so the adapter starts as the base."""
        rng = np.random.default_rng(self.seed)
        weights = {}
        for layer_index, layer in enumerate(model.layers):
            for name in self.target_modules:
                linear = getattr(getattr(layer, TARGET_MODULES[name]), name)
                d_in, d_out = linear.kernel.shape
                bound = 1.0 / math.sqrt(d_in)
                a = rng.uniform(-bound, bound, (d_in, self.rank)).astype(np.float32)
                weights[layer_index, name] = (a, np.zeros((self.rank, d_out), np.float32))
        return LoraAdapter(self.rank, self.alpha, weights)


@dataclasses.dataclass(frozen=True)
class FineTuneJob:
    """Train adapter ``name`` on ``dataset``.

    Attributes:
      name: the adapter's registry name; it is servable from the job's start on.
      dataset: JSONL path or list of ``{"prompt", "completion"}`` dicts.
      lora: the new adapter's configuration.
      hyperparams: per-slot hyperparameters of the runtime's optimizer (e.g.
        ``{"learning_rate": 3e-3}`` for ``optim.adamw``).
      steps: optimizer updates; None: ``epochs`` passes over the training split.
      epochs: used when ``steps`` is None.
      batch_tokens: training tokens per update; a step that grants fewer accumulates.
      eval_fraction: share of records held out for evaluation.
      eval_every: updates between eval losses (also at the start and the end).
      seed: shuffles the records and orders each epoch.
    """

    name: str
    dataset: str | os.PathLike | Sequence[dict]
    lora: LoraConfig = LoraConfig()
    hyperparams: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: int | None = None
    epochs: float = 1.0
    batch_tokens: int = 256
    eval_fraction: float = 0.1
    eval_every: int = 25
    seed: int = 0

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs <= 0 or self.batch_tokens < 1 or self.eval_every < 1:
            raise ValueError("epochs, batch_tokens and eval_every must be positive")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")

    def examples(self, tokenizer) -> tuple[list[Example], list[Example]]:
        """The tokenized (train, eval) split of the dataset; deterministic in ``seed``.

        Raises:
          DatasetError: see ``load_records``.
        """
        return split(tokenize(load_records(self.dataset), tokenizer), self.eval_fraction, self.seed)


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenized record: ``tokens`` int32 [L] = bos + prompt + completion (or a token
    record's ids), the loss on the completion; ``prompt_len`` = bos + prompt tokens."""

    record: Record | TokenRecord
    tokens: np.ndarray
    prompt_len: int

    def sequence(self, slot: int) -> TrainSequence:
        mask = np.arange(len(self.tokens)) >= self.prompt_len
        return TrainSequence(slot, self.tokens, mask)


def tokenize(records: Sequence[Record | TokenRecord], tokenizer) -> list[Example]:
    """Examples of ``records``: the prompt with the tokenizer's special tokens (bos), the
    completion without; token records as they are.

    Raises:
      DatasetError: text records without a tokenizer.
    """
    examples = []
    for record in records:
        if isinstance(record, TokenRecord):
            tokens = np.asarray(record.token_ids, np.int32)
            examples.append(Example(record, tokens, record.prompt_len))
            continue
        if tokenizer is None:
            raise DatasetError("text records need a tokenizer; pass token_ids records instead")
        prompt = tokenizer(record.prompt)["input_ids"]
        completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
        tokens = np.asarray(prompt + completion, np.int32)
        examples.append(Example(record, tokens, len(prompt)))
    return examples


def split(examples: Sequence[Example], eval_fraction: float, seed: int):
    """(train, eval) after a seeded shuffle; eval gets ``ceil(fraction * n)``, at least one
    train example stays."""
    order = np.random.default_rng(seed).permutation(len(examples))
    num_eval = min(math.ceil(eval_fraction * len(examples)), len(examples) - 1)
    shuffled = [examples[i] for i in order]
    return shuffled[num_eval:], shuffled[:num_eval]


def epochs_of(examples: Sequence[Example], seed: int) -> Iterator[Example]:
    """Endless stream of ``examples``, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(examples)):
            yield examples[i]
