"""The model on the Pallas attention kernels (interpreted here, compiled on a GPU) equals
the model on the jnp references: the engine's generations over the paged cache, and the
unified step's losses, gradients and served logits over a KV cache."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loqjax import (
    AdapterRegistry,
    Engine,
    EngineConfig,
    LoraConfig,
    SamplingParams,
    add_lora_tables,
    load_model,
)
from loqjax.kv_cache import init_kv_cache
from loqjax.scheduler import Scheduler, SequenceState
from loqjax.serve_step import ServeRows
from loqjax.unified import TrainSequence, UnifiedBatch, slot_losses, split_model

from hf_reference import rel_err

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
CONFIG = EngineConfig(
    token_capacity=32, max_seqs=4, page_size=8, num_pages=32, max_seq_len=48, token_buckets=(4,)
)


def _model(impl: str):
    _, model = load_model(DEFAULT_MODEL, kernels=impl)
    add_lora_tables(model, num_slots=2, max_rank=4)
    registry = AdapterRegistry(model)
    adapter = LoraConfig(rank=4, alpha=8.0, seed=3).init_adapter(model)
    # Non-zero B, so the adapter changes what is served.
    weights = {
        key: (a, np.random.default_rng(i).normal(0, 0.05, b.shape).astype(np.float32))
        for i, (key, (a, b)) in enumerate(adapter.weights.items())
    }
    registry.load("x", type(adapter)(adapter.rank, adapter.alpha, weights))
    return model, registry


@pytest.fixture(scope="module")
def models():
    return {impl: _model(impl) for impl in ("pallas", "reference")}


def test_engine_generates_alike(models):
    prompts = [[1, 50, 60, 70, 80, 90, 100, 7, 8, 9, 10, 11] * 2, [1, 5, 6], [1, 200, 201, 9]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for impl, (model, registry) in models.items():
        engine = Engine(model, registry, config=CONFIG)
        handles = [
            engine.submit(p, a, params) for p, a in zip(prompts, ["x", None, "x"], strict=True)
        ]
        outputs[impl] = [h.result().token_ids for h in handles]
    assert outputs["pallas"] == outputs["reference"]


@pytest.mark.parametrize("backward", ["save", "recompute"])
def test_unified_step_over_the_cache_alike(models, backward):
    """Training rows through the packed kernel and serving rows through the paged one give
    the reference's losses, gradients and serving logits, with either backward strategy
    (the reference saving its activations)."""
    results = {}
    for impl, (model, _) in models.items():
        graphdef, frozen, params = split_model(model)
        cache = init_kv_cache(model.config, CONFIG.num_pages, CONFIG.page_size, jnp.float32)
        scheduler = Scheduler(CONFIG)
        greedy = SamplingParams(temperature=0.0)
        for i, prompt in enumerate([[1, 4, 5, 6, 7], [1, 9, 8, 7, 6, 5, 4, 3, 2]]):
            scheduler.add(SequenceState(i, prompt, len(prompt), None, greedy, 0))
        rows = ServeRows.pack(scheduler.schedule(), [0, -1], CONFIG, model.config.vocab_size)
        rng = np.random.default_rng(0)
        train = [TrainSequence(0, rng.integers(0, 259, n, np.int32)) for n in (9, 14, 1)]
        batch = UnifiedBatch.pack_cached(
            train, rows, num_train_rows=32, max_train_seqs=4, num_slots=2
        )

        strategy = backward if impl == "pallas" else "save"

        def loss(params, batch=batch, graphdef=graphdef, frozen=frozen, cache=cache, b=strategy):
            return slot_losses(graphdef, frozen, params, batch, cache, backward=b)

        (_, (losses, _, serve_logits, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            params
        )
        results[impl] = jax.tree.map(np.asarray, (losses, serve_logits[:2], grads))
    for got, want in zip(*map(jax.tree.leaves, results.values()), strict=True):
        assert rel_err(got, want) < 1e-5 if np.any(want) else not np.any(got)
