"""Shared by the reliability tests: the tiny served model, its reference request, the
runtime the fault and load tests share (one model structure and step shapes, so one
compile), requests run alone on a fresh engine, and the tally of what was tried."""

from __future__ import annotations

import collections
import itertools
import json
import string
from pathlib import Path

import jax
import numpy as np

from loqjax import (
    AdapterRegistry,
    Engine,
    EngineConfig,
    LoraAdapter,
    RequestOutput,
    Runtime,
    RuntimeConfig,
    SamplingParams,
    add_lora_tables,
    load_model,
)
from loqjax.slo_scheduler import SloTargets
from loqjax.tasks import DATA_DIR
from loqjax.tokenization import load_tokenizer

from hf_reference import random_adapter

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "default"
CONFIG = EngineConfig(token_capacity=32, max_seqs=4, page_size=4, num_pages=48, max_seq_len=64)
NUM_SLOTS, MAX_RANK = 2, 4
ADAPTER = "rnd"
# Seeded sampling through the adapter: any corrupted table, page or sampler state shows.
REFERENCE = ("upper: abc =>", ADAPTER, SamplingParams(temperature=0.8, seed=7, max_tokens=12))

# category -> count; "fault: ..." categories count injected faults, "completed: ..." ones
# requests that finished correctly under load, the others bad inputs.
TRIED: collections.Counter[str] = collections.Counter()


def make_engine() -> Engine:
    """A fresh engine serving the default model and adapter ``ADAPTER`` (rank 4, q/v)."""
    _, model = load_model(DEFAULT_MODEL)
    add_lora_tables(model, num_slots=NUM_SLOTS, max_rank=MAX_RANK)
    registry = AdapterRegistry(model)
    registry.load(ADAPTER, random_adapter(model, MAX_RANK, 8.0, ("q_proj", "v_proj"), seed=3))
    return Engine(model, registry, load_tokenizer(DEFAULT_MODEL), CONFIG, eos_token_ids=(2,))


def table_snapshot(registry: AdapterRegistry) -> dict:
    """Host copies of every table array, to check that a failed call wrote nothing."""
    return {
        (*key, var): np.array(getattr(table, var)[...])
        for key, table in registry._tables.items()
        for var in ("a", "b", "scale")
    }


# --- the runtime of the fault and load tests -----------------------------------------

# A small page pool (40 pages of 4 tokens: 5 sequences of max_seq_len) under 16 sequence
# rows, so bursts exhaust it; prefill and decode at 64 rows (one serving compile); training
# rows for two or three jobs' examples (~20 tokens each). The SLO targets are tight against
# the step clock below (every step lasts 0.02 s on it), so the policy mixes unified and
# serving-only steps; under load, a quarter of them train (the default min_train_share).
RUNTIME_CONFIG = RuntimeConfig(
    serving=EngineConfig(token_capacity=64, max_seqs=16, page_size=4, num_pages=40, max_seq_len=32),
    train_rows=64,
    max_train_seqs=4,
    unified_serve_rows=32,
    slo=SloTargets(ttft_s=0.1, tpot_s=0.04),
)
RUNTIME_SLOTS = 12  # the serving adapters, up to three jobs, one spare
TARGET_SETS = [
    ("q_proj", "v_proj"),
    ("k_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
]
# Eight adapters that no job trains: ranks 1-4, four target sets.
SERVING_ADAPTERS = {
    f"serve{i}": (1 + i % 4, 2.0 * (1 + i % 4), TARGET_SETS[i % 4], 100 + i) for i in range(8)
}
SERVED = [*SERVING_ADAPTERS, None]  # what traffic names: those adapters and the base
GUEST = "guest"  # the adapter name under which ``Alone`` serves given weights


def serving_model():
    """A fresh default model with ``RUNTIME_SLOTS`` slots and ``SERVING_ADAPTERS`` loaded."""
    _, model = load_model(DEFAULT_MODEL)
    add_lora_tables(model, num_slots=RUNTIME_SLOTS, max_rank=MAX_RANK)
    registry = AdapterRegistry(model)
    for name, (rank, alpha, targets, seed) in SERVING_ADAPTERS.items():
        registry.load(name, random_adapter(model, rank, alpha, targets, seed=seed))
    return model, registry


def records(task: str, count: int) -> list[dict]:
    """The first ``count`` records of a task's dataset (``loqjax/data``)."""
    lines = (DATA_DIR / f"{task}.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


class StepClock:
    """A deterministic clock: each reading is 0.01 s after the previous one, so every step
    (three readings) lasts 0.02 s and the policy's choices do not depend on the machine."""

    def __init__(self):
        self._ticks = itertools.count()

    def __call__(self) -> float:
        return next(self._ticks) * 0.01


def make_runtime() -> Runtime:
    """A runtime over ``serving_model()`` with ``RUNTIME_CONFIG``; runtimes made here share
    their compiled steps (same model structure, shapes and default optimizer)."""
    model, registry = serving_model()
    return Runtime(
        model,
        registry,
        load_tokenizer(DEFAULT_MODEL),
        RUNTIME_CONFIG,
        progress=False,
        clock=StepClock(),
        eos_token_ids=(2,),
    )


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def task_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct prompts in the tasks' format, 2 to 22 tokens (with bos)."""
    rng = np.random.default_rng(seed)
    prompts: set[str] = set()
    while len(prompts) < count:
        task = rng.choice(["upper", "swapcase", "reverse", "copy", "add", ""])
        word = "".join(rng.choice(list(string.ascii_letters), int(rng.integers(1, 9))))
        prompts.add(f"{task}: {word} =>" if task else word)
    return sorted(prompts)


# Traffic draws from a fixed pool, so that ``Alone`` runs each distinct request once for
# every test: 12 prompts x ``SERVED``, each with its own greedy length (3 to 8 tokens).
PROMPTS = task_prompts(12, seed=0)


def pool_request(rng: np.random.Generator) -> tuple[str, str | None, SamplingParams]:
    """A (prompt, adapter, sampling) drawn from the pool."""
    p, a = int(rng.integers(len(PROMPTS))), int(rng.integers(len(SERVED)))
    return PROMPTS[p], SERVED[a], greedy(3 + (p + a) % 6)


class Alone:
    """Requests run one at a time, with nothing else in flight and no job, on a runtime of
    their own over ``serving_model()`` (``make_runtime``: the serving step that the
    runtimes under test compiled). Each distinct request runs once."""

    def __init__(self):
        self.runtime = make_runtime()
        self._outputs: dict[tuple, RequestOutput] = {}
        self._guest: object = None  # key of the weights loaded as GUEST

    def __call__(
        self,
        prompt: str,
        adapter: str | None,
        sampling: SamplingParams,
        weights: tuple[object, LoraAdapter] | None = None,
    ) -> RequestOutput:
        """The output of the request on its own: through ``adapter`` (a serving adapter,
        or None for the base), or with ``weights`` = (a hashable key naming them, the
        adapter) through those weights instead."""
        key = (prompt, adapter if weights is None else ("weights", weights[0]), sampling)
        if key not in self._outputs:
            if weights is not None:
                self._serve_as_guest(*weights)
                adapter = GUEST
            self._outputs[key] = self.runtime.submit(prompt, adapter, sampling).result()
            assert self.runtime.num_free_pages == RUNTIME_CONFIG.serving.num_pages
        return self._outputs[key]

    def _serve_as_guest(self, key: object, adapter: LoraAdapter) -> None:
        if self._guest is None:
            self.runtime.load_adapter(GUEST, adapter)
        elif self._guest != key:
            self.runtime.replace_adapter(GUEST, adapter)
        self._guest = key


def same_output(out: RequestOutput, alone: RequestOutput) -> bool:
    return (out.token_ids, out.text, out.finish_reason) == (
        alone.token_ids,
        alone.text,
        alone.finish_reason,
    )


def check_pages(runtime: Runtime) -> None:
    """The page pool is conserved: running sequences hold distinct pages, waiting ones
    none, and those plus the free pages are the whole pool (no leak, no double use)."""
    scheduler = runtime._scheduler
    held = [page for seq in scheduler.running for page in seq.pages]
    assert len(held) == len(set(held))
    assert not any(seq.pages for seq in scheduler.waiting)
    assert len(held) + runtime.num_free_pages == RUNTIME_CONFIG.serving.num_pages


def slot_bits(runtime: Runtime, slot: int) -> list[np.ndarray]:
    """Host copies of ``slot``'s adapter weights in the runtime (every table's A and B),
    as uint32 bit patterns, to compare bit for bit."""
    return [
        np.asarray(leaf[slot]).view(np.uint32) for leaf in jax.tree.leaves(runtime._state.params)
    ]


def same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
