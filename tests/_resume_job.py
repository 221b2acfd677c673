"""A small fine-tuning job on the unified step, run straight through or resumed from a job
checkpoint; ``test_checkpointing`` runs each in a fresh process:

    python tests/_resume_job.py straight MODEL_DIR JOB_DIR K M OUT.npz
        trains K steps, saves the job, trains M more;
    python tests/_resume_job.py resume MODEL_DIR JOB_DIR M OUT.npz
        restores the newest job step into another slot and trains M more.

Both write the trained slot of every params and optimizer leaf to OUT.npz.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from loqjax import AdapterRegistry, LoraAdapter, add_lora_tables, load_model, lora_tables
from loqjax.ckpt import JobCheckpoints
from loqjax.ckpt.tree import flatten_pytree
from loqjax.optim import SlotOptimizer, adamw
from loqjax.unified import (
    ServeSequence,
    TrainSequence,
    TrainState,
    UnifiedBatch,
    make_unified_step,
    split_model,
)

NUM_SLOTS, MAX_RANK = 3, 4
TARGETS = ("q_proj", "v_proj", "down_proj")  # tables on these alone: a quicker compile
TRAIN_ROWS, SERVE_ROWS, NUM_SEGMENTS, NUM_SAMPLES = 24, 8, 4, 1
OPTIMIZER = SlotOptimizer(adamw(1e-2, weight_decay=0.1))
JOB = "poet"
LEARNING_RATE = 3e-3  # the job's own, set in its slot: the checkpoint must carry it
DATA_SEED, RNG_SEED = 0, 42


def build(model_dir: str, max_rank: int = MAX_RANK):
    """(model, registry): the base of ``model_dir`` with empty adapter tables."""
    _, model = load_model(model_dir)
    add_lora_tables(model, num_slots=NUM_SLOTS, max_rank=max_rank, target_modules=TARGETS)
    return model, AdapterRegistry(model)


def initial_adapter(model) -> LoraAdapter:
    """Rank 3 rsLoRA on every table, with random A and B."""
    rng = np.random.default_rng(1)
    weights = {
        key: (
            rng.normal(0.0, 0.1, (table.a.shape[1], 3)).astype(np.float32),
            rng.normal(0.0, 0.1, (3, table.b.shape[2])).astype(np.float32),
        )
        for key, table in lora_tables(model).items()
    }
    return LoraAdapter(3, 6.0, weights, use_rslora=True)


def train(step_fn, frozen, state, slot, first_step, num_steps, rng, position, vocab_size):
    """Steps ``first_step`` .. ``first_step + num_steps - 1`` of the job in slot ``slot``.

    Each step splits ``rng`` to draw a sequence length and reads that many tokens of a
    fixed corpus from ``position``, next to a base-model serving request; even steps
    only accumulate. Returns (state, rng, position).
    """
    corpus = np.random.default_rng(DATA_SEED).integers(0, vocab_size, 4096, dtype=np.int32)
    for step in range(first_step, first_step + num_steps):
        rng, key = jax.random.split(rng)
        length = 6 + int(jax.random.randint(key, (), 0, 12))
        tokens = corpus[position : position + length]
        position += length
        batch = UnifiedBatch.pack(
            [TrainSequence(slot, tokens)],
            [ServeSequence(-1, tokens[:5])],
            num_train_rows=TRAIN_ROWS,
            num_serve_rows=SERVE_ROWS,
            num_segments=NUM_SEGMENTS,
            num_samples=NUM_SAMPLES,
            num_slots=NUM_SLOTS,
            accumulate=(slot,) if step % 2 == 0 else (),
        )
        state, _, _ = step_fn(frozen, state, batch)
    return state, rng, position


def save_slot(out: str, state: TrainState, slot: int) -> None:
    """Writes slot ``slot`` of every params and optimizer leaf, by dotted path."""
    arrays = {path: np.asarray(x[slot]) for path, x in flatten_pytree(state).items()}
    np.savez(out, slot=slot, **arrays)


def straight(model_dir: str, job_dir: str, k: int, m: int, out: str) -> None:
    model, registry = build(model_dir)
    slot = registry.load(JOB, initial_adapter(model))
    graphdef, frozen, params = split_model(model)
    state = TrainState.create(params, OPTIMIZER)
    state = state._replace(
        opt=OPTIMIZER.set_hyperparams(state.opt, slot, learning_rate=LEARNING_RATE)
    )
    step_fn = make_unified_step(graphdef, OPTIMIZER)
    vocab_size = model.config.vocab_size
    with JobCheckpoints(model, OPTIMIZER, JOB, directory=job_dir) as jobs:
        rng, position = jax.random.key(RNG_SEED), 0
        state, rng, position = train(step_fn, frozen, state, slot, 0, k, rng, position, vocab_size)
        jobs.save(k, state, registry.info(JOB), data_position=position, rng=rng)
        state, _, _ = train(step_fn, frozen, state, slot, k, m, rng, position, vocab_size)
    save_slot(out, state, slot)


def resume(model_dir: str, job_dir: str, m: int, out: str) -> None:
    model, registry = build(model_dir)
    with JobCheckpoints(model, OPTIMIZER, JOB, directory=job_dir) as jobs:
        job = jobs.restore()
    registry.load("other", job.adapter)  # takes the job's old slot: it resumes in another
    slot = registry.load(JOB, job.adapter)
    graphdef, frozen, params = split_model(model)
    state = job.install(TrainState.create(params, OPTIMIZER), slot)
    step_fn = make_unified_step(graphdef, OPTIMIZER)
    state, _, _ = train(
        step_fn,
        frozen,
        state,
        slot,
        job.step,
        m,
        job.rng,
        job.data_position,
        model.config.vocab_size,
    )
    save_slot(out, state, slot)


if __name__ == "__main__":
    mode, model_dir, job_dir, *counts, out = sys.argv[1:]
    {"straight": straight, "resume": resume}[mode](model_dir, job_dir, *map(int, counts), out)
