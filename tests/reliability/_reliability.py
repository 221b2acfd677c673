"""Shared by the reliability tests: the tiny served model, its reference request, and a
tally of the bad inputs tried."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from loqjax import (
    AdapterRegistry,
    Engine,
    EngineConfig,
    SamplingParams,
    add_lora_tables,
    load_model,
)
from loqjax.tokenization import load_tokenizer

from hf_reference import random_adapter

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "default"
CONFIG = EngineConfig(token_capacity=32, max_seqs=4, page_size=4, num_pages=48, max_seq_len=64)
NUM_SLOTS, MAX_RANK = 2, 4
ADAPTER = "rnd"
# Seeded sampling through the adapter: any corrupted table, page or sampler state shows.
REFERENCE = ("upper: abc =>", ADAPTER, SamplingParams(temperature=0.8, seed=7, max_tokens=12))

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
