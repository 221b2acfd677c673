"""Sharded steps against the single-device ones on 8 fake CPU devices; ``test_sharding``
runs it in a fresh process, since the device count is fixed when jax starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharded_steps.py OUT.json

(the test adds ``--xla_backend_optimization_level=0``: compiling the interpreted kernels
dominates the run, and LLVM's optimisations do not change results.)

On a tiny random model whose 8 KV heads split over an 8-way model axis, for the meshes
1x8, 2x4 and 8x1 (data x model):

* two unified steps over a paged KV cache (training rows of two adapters, prefill then
  decode rows of three requests), with the "save" backward on every mesh, the
  "recompute" one on 2x4 and the (interpreted) Pallas kernels under ``shard_map`` on 2x4,
  against the single-device "save" steps on the jnp references: outputs, params,
  optimizer state and KV pools; the layouts the state and cache keep; one compilation;
* greedy generations of the serving ``Engine`` on 2x4, on the jnp attention references
  and on the (interpreted) Pallas paged-attention kernel, against the single device;
* adapter unload/load/export on sharded tables (layouts kept, values exact, served
  like the single-device model's), and orbax adapter and job checkpoints saved from
  sharded tables and state (the 2x4 steps') and restored into sharded ones.

Writes a JSON report of max relative errors and facts, which the test asserts on.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import pallas as pl

from loqjax import (
    AdapterRegistry,
    CausalLM,
    Engine,
    EngineConfig,
    LoraAdapter,
    ModelConfig,
    SamplingParams,
    add_lora_tables,
    lora_tables,
)
from loqjax.ckpt import AdapterCheckpoints, JobCheckpoints
from loqjax.ckpt.tree import flatten_pytree
from loqjax.kv_cache import init_kv_cache
from loqjax.optim import SlotOptimizer, adamw
from loqjax.scheduler import Scheduler, SequenceState
from loqjax.serve_step import ServeRows
from loqjax.sharding import (
    cache_shardings,
    init_cache,
    make_mesh,
    replicated,
    shard_model,
    tree_shardings,
)
from loqjax.unified import TrainSequence, TrainState, UnifiedBatch, make_unified_step, split_model

CONFIG = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=16,  # two query heads per KV head: GQA groups must stay on one device
    num_kv_heads=8,
    head_dim=16,  # the smallest the paged kernel takes
    max_position_embeddings=256,
)
MESHES = ((1, 8), (2, 4), (8, 1))
NUM_SLOTS, MAX_RANK = 3, 4
OPTIMIZER = SlotOptimizer(adamw(1e-2, weight_decay=0.1))
# Static capacities: 24 training and 16 serving rows, multiples of every "data" size.
TRAIN_ROWS, MAX_TRAIN_SEQS = 24, 3
CACHE = EngineConfig(token_capacity=16, max_seqs=4, page_size=4, num_pages=16, max_seq_len=32)
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
PROMPTS = [([1, 9, 8, 7, 6], "a"), ([1, 5, 6], None), ([1, 40, 41, 42, 43, 44], "b")]


def adapter(rank: int, seed: int, targets=None) -> LoraAdapter:
    """Random A and B on every table (or on ``targets``), so adapters change outputs."""
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(seed)
    weights = {}
    for i, layer in enumerate(model.layers):
        for parent, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
            for short in names:
                name = f"{short}_proj"
                if targets is not None and name not in targets:
                    continue
                d_in, d_out = getattr(getattr(layer, parent), name).kernel.shape
                weights[i, name] = (
                    rng.normal(0, 0.2, (d_in, rank)).astype(np.float32),
                    rng.normal(0, 0.2, (rank, d_out)).astype(np.float32),
                )
    return LoraAdapter(rank, 2.0 * rank, weights)


ADAPTERS = {
    "a": adapter(4, 1),
    "b": adapter(2, 2, ("q_proj", "v_proj", "o_proj", "down_proj")),
    "c": adapter(3, 3),
}


def build(mesh=None, kernels="auto"):
    """(model, registry): the same random base with adapters "a" (slot 0) and "b" (slot
    1) loaded, then placed on ``mesh`` if given."""
    model = CausalLM(CONFIG, rngs=nnx.Rngs(0), kernels=kernels)
    add_lora_tables(model, num_slots=NUM_SLOTS, max_rank=MAX_RANK)
    registry = AdapterRegistry(model)
    registry.load("a", ADAPTERS["a"])
    registry.load("b", ADAPTERS["b"])
    if mesh is not None:
        shard_model(model, mesh)
    return model, registry


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / scale) if scale else float(np.abs(got).max())


def max_err(got: dict, want: dict) -> tuple[float, str]:
    """The largest ``rel_err`` over the leaves of two flat trees, and its path."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    return max((rel_err(got[k], want[k]), k) for k in want)


def spec_str(sharding) -> str:
    return str(tuple(sharding.spec))


def layouts_kept(tree, mesh, shardings=None) -> bool:
    """Every array of ``tree`` lies on ``mesh`` in its ``shardings`` (default its
    ``tree_shardings``) layout."""
    want = flatten_pytree(tree_shardings(tree, mesh) if shardings is None else shardings)
    return all(
        x.sharding.is_equivalent_to(want[k], x.ndim) and x.sharding.mesh == mesh
        for k, x in flatten_pytree(tree).items()
    )


def train_seq(slot, n, prompt, seed) -> TrainSequence:
    tokens = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n, dtype=np.int32)
    return TrainSequence(slot, tokens, np.arange(n) >= prompt)


class Trained(NamedTuple):
    """A model after ``unified_steps``, its trained tables written back."""

    model: CausalLM
    registry: AdapterRegistry
    state: TrainState


def unified_steps(mesh=None, backward="save", kernels="auto") -> tuple[dict, Trained]:
    """Two unified steps over the KV cache: slot 0 accumulates then applies, slot 1
    applies at once; three requests prefill, then decode."""
    model, registry = build(mesh, kernels)
    graphdef, frozen, params = split_model(model)
    state = TrainState.create(params, OPTIMIZER)
    step = make_unified_step(graphdef, OPTIMIZER, backward=backward)
    pool = (CONFIG, CACHE.num_pages, CACHE.page_size, jnp.float32)
    if mesh is None:
        cache, placement = init_kv_cache(*pool), None
    else:
        cache, placement = init_cache(*pool, mesh), replicated(mesh)
    scheduler = Scheduler(CACHE)
    for i, (prompt, name) in enumerate(PROMPTS):
        scheduler.add(SequenceState(i, list(prompt), len(prompt), name, GREEDY, 0))
    trains = [
        ([train_seq(0, 9, 3, 10), train_seq(1, 7, 0, 11)], (0,)),
        ([train_seq(0, 11, 2, 12)], ()),
    ]
    outputs = []
    for train, accumulate in trains:
        chunks = scheduler.schedule()
        slots = [-1 if c.seq.adapter is None else registry.info(c.seq.adapter).slot for c in chunks]
        rows = ServeRows.pack(chunks, slots, CACHE, CONFIG.vocab_size)
        batch = UnifiedBatch.pack_cached(
            train,
            rows,
            num_train_rows=TRAIN_ROWS,
            max_train_seqs=MAX_TRAIN_SEQS,
            num_slots=NUM_SLOTS,
            accumulate=accumulate,
            placement=placement,
        )
        state, cache, out = step(frozen, state, batch, cache)
        out = jax.tree.map(np.asarray, out)
        for chunk, token in zip(chunks, out.next_tokens, strict=False):
            chunk.seq.num_computed = chunk.stop
            chunk.seq.token_ids.append(int(token))
        outputs.append(
            {
                "loss": out.loss,
                "num_tokens": out.num_tokens,
                "grad_norm": out.grad_norm,
                "updated": out.updated,
                "next_logits": out.next_logits[: len(chunks)],
                "next_tokens": out.next_tokens[: len(chunks)],
            }
        )
    result = {
        "outputs": flatten_pytree(jax.device_get(outputs)),
        "params": flatten_pytree(jax.device_get(state.params)),
        "opt": flatten_pytree(jax.device_get(state.opt)),
        "cache": flatten_pytree(jax.device_get(cache)),
        "compilations": step._cache_size(),
    }
    nnx.update(model, state.params)  # the step donated the model's own table buffers
    if mesh is not None:
        table = lora_tables(model)
        result["layouts"] = {
            "state": layouts_kept(state, mesh),
            "frozen": layouts_kept(frozen, mesh),
            "cache": layouts_kept(cache, mesh, cache_shardings(cache, mesh)),
            "q_b": spec_str(table[0, "q_proj"].b.sharding),
            "o_a": spec_str(table[0, "o_proj"].a.sharding),
            "q_kernel": spec_str(frozen["layers"][0]["self_attn"]["q_proj"]["kernel"].sharding),
            "down_kernel": spec_str(frozen["layers"][0]["mlp"]["down_proj"]["kernel"].sharding),
            "embedding": spec_str(frozen["embed_tokens"]["embedding"].sharding),
            # The optimizer's gradient sums of the tables, stacked across layers [N, L, ...].
            "q_b_grad_sum": spec_str(_stacked(state.opt.grad_sum, "self_attn", "q_proj", "b")),
            "o_a_grad_sum": spec_str(_stacked(state.opt.grad_sum, "self_attn", "o_proj", "a")),
        }
    return result, Trained(model, registry, state)


def _stacked(tree, block: str, proj: str, matrix: str):
    return tree["layers"]["*"][block][proj]["adapters"][matrix].sharding


def compare_steps(got: dict, want: dict) -> dict:
    report = {}
    for part in ("outputs", "params", "opt", "cache"):
        err, path = max_err(got[part], want[part])
        report[part] = {"max_rel_err": err, "at": path}
    report["same_tokens"] = all(
        np.array_equal(got["outputs"][k], want["outputs"][k])
        for k in want["outputs"]
        if k.endswith(("next_tokens", "num_tokens", "updated"))
    )
    report["compilations"] = got["compilations"]
    report["layouts"] = got.get("layouts")
    return report


def generate(model, registry, names) -> tuple[list[list[int]], str | None]:
    """Greedy generations of ``PROMPTS`` for adapters ``names``, and the KV pools' layout."""
    engine = Engine(model, registry, config=CACHE)
    prompts = [prompt for prompt, _ in PROMPTS]
    handles = [engine.submit(p, name, GREEDY) for p, name in zip(prompts, names, strict=True)]
    tokens = [list(h.result().token_ids) for h in handles]
    spec = spec_str(engine._cache[0].k.sharding) if engine.mesh is not None else None
    return tokens, spec


def engine_checks(mesh, impl="auto") -> dict:
    names = [name for _, name in PROMPTS]
    model, registry = build(mesh, impl)
    tokens, cache_spec = generate(model, registry, names)
    return {"tokens": tokens, "cache_spec": cache_spec}


def registry_checks(mesh, directory: str) -> dict:
    """Unload "b", load "c" in its slot, export it; serve with it; save it to an adapter
    checkpoint and load that into another sharded model's registry."""
    report = {}
    results = {}
    for where, m in (("single", None), ("mesh", mesh)):
        model, registry = build(m)
        tables = lora_tables(model)
        before = {k: (t.a.sharding, t.b.sharding, t.scale.sharding) for k, t in tables.items()}
        registry.unload("b")
        zeroed = all(
            not np.asarray(t.a[...][1]).any() and not np.asarray(t.b[...][1]).any()
            for t in tables.values()
        )
        slot = registry.load("c", ADAPTERS["c"])
        exported = registry.export("c")
        exact = all(
            np.array_equal(exported.weights[k][0], a) and np.array_equal(exported.weights[k][1], b)
            for k, (a, b) in ADAPTERS["c"].weights.items()
        )
        after = {k: (t.a.sharding, t.b.sharding, t.scale.sharding) for k, t in tables.items()}
        tokens, _ = generate(model, registry, ["c", None, "a"])
        results[where] = tokens
        if m is None:
            continue
        report.update(slot=slot, zeroed=zeroed, exact_export=exact, layouts_kept=before == after)
        with AdapterCheckpoints(model, "c", directory=f"{directory}/c", async_save=False) as ckpts:
            ckpts.save(exported)
            other, other_registry = build(make_mesh(1, 8))
            loaded_slot = ckpts.load(other_registry, "c")
        again = other_registry.export("c")
        report["checkpoint_exact"] = all(
            np.array_equal(again.weights[k][0], a) and np.array_equal(again.weights[k][1], b)
            for k, (a, b) in ADAPTERS["c"].weights.items()
        )
        report["checkpoint_slot"] = loaded_slot
        report["checkpoint_layouts"] = layouts_kept(nnx.state(other), make_mesh(1, 8))
    report["same_tokens"] = results["single"] == results["mesh"]
    return report


def job_checks(trained: Trained, mesh, directory: str) -> dict:
    """A job checkpoint of a sharded unified step's state restores into another slot of
    a fresh sharded state, bit-exactly, keeping the layout."""
    model, registry, state = trained
    with JobCheckpoints(model, OPTIMIZER, "a", directory=f"{directory}/job") as jobs:
        jobs.save(1, state, registry.info("a"), data_position=9)
        job = jobs.restore()
    fresh_model, fresh_registry = build(mesh)
    slot = fresh_registry.load("job", job.adapter)  # slot 2: not the job's old slot
    _, _, fresh_params = split_model(fresh_model)
    fresh = job.install(TrainState.create(fresh_params, OPTIMIZER), slot)
    want = jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(state.opt))
    got = jax.tree.map(lambda x: np.asarray(x)[slot], jax.device_get(fresh.opt))
    same = all(
        np.array_equal(g, w)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )
    return {
        "slot": slot,
        "opt_trained": any(np.any(w) for w in jax.tree.leaves(want)),  # not a fresh state
        "opt_exact": same,
        "layouts_kept": layouts_kept(fresh, mesh),
    }


class Timer:
    """Seconds of each part, printed as it finishes (progress on stderr)."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        print(f"{name}: {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)


def warm_interpreter() -> None:
    """Lower one interpreted kernel. The first such lowering imports JAX's interpreter
    modules, which register a config state and so change the tracing context: a step
    traced before that point and called again after it would compile twice (compiled
    kernels import nothing at lowering)."""

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    kernel = pl.pallas_call(
        copy,
        out_shape=jax.ShapeDtypeStruct((1,), jnp.float32),
        interpret=True,
    )
    jax.jit(kernel).lower(jnp.zeros((1,), jnp.float32))


def main(out: str) -> None:
    devices = jax.device_count()
    assert devices == 8, f"needs 8 devices (XLA_FLAGS), got {devices}"
    warm_interpreter()
    report, timer = {}, Timer()
    with timer("steps single"):
        reference, _ = unified_steps()
    for shape in MESHES:
        name = f"steps {shape[0]}x{shape[1]}"
        with timer(name):
            got, trained = unified_steps(make_mesh(*shape))
            report[name] = compare_steps(got, reference)
        if shape == (2, 4):
            trained_2x4 = trained
    with timer("recompute steps 2x4"):
        got, _ = unified_steps(make_mesh(2, 4), backward="recompute")
        report["recompute steps 2x4"] = compare_steps(got, reference)
    with timer("pallas steps 2x4"):  # the (interpreted) kernels, each device on its shard
        got, _ = unified_steps(make_mesh(2, 4), kernels="pallas")
        report["pallas steps 2x4"] = compare_steps(got, reference)
    for name, mesh, impl in [
        ("single", None, "auto"),
        ("2x4", make_mesh(2, 4), "auto"),
        ("pallas 2x4", make_mesh(2, 4), "pallas"),
    ]:
        with timer(f"engine {name}"):
            report[f"engine {name}"] = engine_checks(mesh, impl)
    with tempfile.TemporaryDirectory() as directory:
        with timer("registry 2x4"):
            report["registry 2x4"] = registry_checks(make_mesh(2, 4), directory)
        with timer("job checkpoint 2x4"):
            report["job checkpoint 2x4"] = job_checks(trained_2x4, make_mesh(2, 4), directory)
    report["seconds"] = timer.seconds
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
