"""Serving and fine-tuning throughput over 1, 2, 4 and 8 devices (``loqjax.sharding``:
tensor parallel over "model", data parallel over "data").

  PYTHONPATH=. python benchmarks/bench_scaling.py --out benchmarks/results/scaling.jsonl
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \\
      python benchmarks/bench_scaling.py --config tiny   # every mesh, on 8 fake CPU devices

Meshes (``--meshes``): "1" is one device without a mesh (the baseline), "DxM" a mesh of
D-way data and M-way model parallelism. Default: "1", then "1xn" (tensor parallel) and
"nx1" (data parallel) for each n of 2, 4, 8 that the host has devices for.

First a check (``--check-meshes``, default the measured meshes but "1"): on a tiny
float32 model (``TINY`` with 8 KV heads, so that every model axis up to 8 splits it) at
the highest matmul precision, one unified step (training rows of two adapters, serving
rows) and greedy engine generations on each mesh against one device: the max relative
errors of the step's outputs and adapter gradients, and whether the tokens are the same. The
run exits non-zero if a mesh fails it. ``--meshes`` or ``--check-meshes`` without a value
skips the measurements or the check (``benchmarks/gpu_run.sh`` splits a run so).

Then, per mesh, on ``--config`` (``8b``: the Llama-3-8B shape, ``tiny``: the check's
model; bf16, random weights, drawn on the device) with 8-slot rank-8 tables on all seven
projections and four random adapters:

* serving: ``--batch`` requests of ``--prompt-len`` random ids, each generating
  ``--new-tokens`` greedy tokens, adapters cycled (``bench_inference.generate``, after a
  warm-up run that compiles): decode tokens/s and the median decode step;
* fine-tuning: unified steps without serving rows, ``--seqs`` sequences of ``--seq-len``
  random ids for each of ``--adapters`` slots (AdamW, every step applied): tokens/s over
  ``--steps`` timed steps after two that compile.

Reported per mesh: both throughputs and their speedups over "1", the warm-ups (mostly
compilation) and the most memory in use on any of the mesh's devices after fine-tuning.
Serving rows are replicated over "data" (see ``loqjax.sharding``): data parallelism
speeds up fine-tuning only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loqjax import AdapterRegistry, Engine, EngineConfig, SamplingParams, add_lora_tables
from loqjax.optim import SlotOptimizer, adamw
from loqjax.sharding import make_mesh, replicated, shard_model
from loqjax.unified import (
    ServeSequence,
    TrainSequence,
    TrainState,
    UnifiedBatch,
    make_unified_step,
    split_model,
)

from bench_common import (
    GIB,
    LLAMA3_8B,
    TINY,
    Rows,
    Timer,
    load_adapters,
    random_adapter,
    random_model,
    random_training_batch,
)
from bench_inference import generate

# TINY with as many KV heads as the widest model axis (8), so that every mesh splits it.
TINY8 = dataclasses.replace(TINY, num_heads=16, num_kv_heads=8)
CONFIGS = {"8b": LLAMA3_8B, "tiny": TINY8}
NUM_SLOTS, MAX_RANK = 8, 8
# float32 sharded vs single device: the same math, reduced in another order.
CHECK_TOLERANCE = {"outputs": 1e-4, "grads": 1e-4}


def parse_mesh(name: str) -> tuple[int, int] | None:
    """ "1" -> None (no mesh); "DxM" -> (D, M)."""
    if name == "1":
        return None
    data, model = name.split("x")
    return int(data), int(model)


def default_meshes(num_devices: int) -> list[str]:
    names = ["1"]
    for n in (2, 4, 8):
        if n <= num_devices:
            names += [f"1x{n}", f"{n}x1"]
    return names


def mesh_named(name: str):
    shape = parse_mesh(name)
    return None if shape is None else make_mesh(*shape)


# --- the check --------------------------------------------------------------------------


def check_run(mesh) -> dict:
    """One unified step and greedy generations of the check's model on ``mesh`` (None:
    one device): {"outputs", "grads": name -> array, "tokens": lists}. The step only
    accumulates its slots' gradients (compared before any optimizer transforms them),
    then applies nothing."""
    model = random_model(TINY8, jnp.float32, seed=1)
    add_lora_tables(model, num_slots=4, max_rank=MAX_RANK)
    registry = AdapterRegistry(model)
    for i in range(2):  # random A and B, so that both change outputs and gradients
        registry.load(f"a{i}", random_adapter(model, rank=4 * (i + 1), alpha=16.0, seed=i))
    placement = None
    if mesh is not None:
        shard_model(model, mesh)
        placement = replicated(mesh)
    rng = np.random.default_rng(0)

    def ids(n):
        return rng.integers(0, TINY8.vocab_size, n, np.int32)

    train = [TrainSequence(slot, ids(n)) for slot, n in ((0, 20), (1, 13), (0, 9))]
    serve = [ServeSequence(slot, ids(n)) for slot, n in ((1, 7), (-1, 5), (0, 11))]
    batch = UnifiedBatch.pack(
        train,
        serve,
        num_train_rows=48,  # 48 and 24 rows: multiples of every "data" size
        num_serve_rows=24,
        num_segments=len(train) + len(serve) + 1,
        num_samples=4,
        num_slots=4,
        accumulate=range(4),
        placement=placement,
    )
    optimizer = SlotOptimizer(adamw(1e-3))
    graphdef, frozen, params = split_model(model)
    step = make_unified_step(graphdef, optimizer)
    state, _, out = step(frozen, TrainState.create(params, optimizer), batch)
    nnx.update(model, state.params)  # the step donated the model's table buffers
    engine = Engine(
        model,
        registry,
        config=EngineConfig(
            token_capacity=32, max_seqs=4, page_size=16, num_pages=9, max_seq_len=32
        ),
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [(ids(9).tolist(), "a0"), (ids(5).tolist(), None), (ids(12).tolist(), "a1")]
    handles = [engine.submit(prompt, name, greedy) for prompt, name in prompts]
    grads, _ = jax.tree_util.tree_flatten_with_path(state.opt.grad_sum)
    return {
        "outputs": {
            "loss": np.asarray(out.loss),
            "grad_norm": np.asarray(out.grad_norm),
            "next_logits": np.asarray(out.next_logits),
        },
        "grads": {jax.tree_util.keystr(p): np.asarray(x) for p, x in grads},
        "tokens": [list(h.result().token_ids) for h in handles],
    }


def max_rel_err(got: dict, want: dict) -> float:
    """The largest error over matching arrays, each relative to its reference's max."""
    errs = []
    for k, w in want.items():
        w, g = np.asarray(w, np.float64), np.asarray(got[k], np.float64)
        errs.append(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
    return float(max(errs))


def check(names: list[str], rows: Rows) -> bool:
    """Checks every mesh of ``names`` against one device; whether all pass."""
    ok = True
    with jax.default_matmul_precision("highest"):  # no TF32 on a GPU: float32 proper
        want = check_run(None)
        for name in names:
            got = check_run(mesh_named(name))
            errs = {part: max_rel_err(got[part], want[part]) for part in CHECK_TOLERANCE}
            same = got["tokens"] == want["tokens"]
            passed = same and all(errs[p] < tol for p, tol in CHECK_TOLERANCE.items())
            ok &= passed
            rows.add(
                variant="check",
                mesh=name,
                outputs_max_rel_err=errs["outputs"],
                grads_max_rel_err=errs["grads"],
                same_tokens=same,
                passed=passed,
            )
    return ok


# --- the measurements -------------------------------------------------------------------


def serve(model, registry, names, args) -> dict:
    """Decode throughput of an engine over ``model`` (on its mesh, if any)."""
    seq_len = args.prompt_len + args.new_tokens
    page_size = 16
    engine = Engine(
        model,
        registry,
        config=EngineConfig(
            token_capacity=max(args.prefill_capacity, args.batch),
            max_seqs=args.batch,
            page_size=page_size,
            num_pages=args.batch * -(-seq_len // page_size) + 1,
            max_seq_len=seq_len,
            token_buckets=(args.batch,),  # decode steps at the batch's rows
        ),
    )
    with Timer() as warm:  # compiles the prefill and decode buckets
        generate(engine, args.batch, names, args.prompt_len, 2, seed=1)
    prefill_s, total_s, steps = generate(
        engine, args.batch, names, args.prompt_len, args.new_tokens, seed=2
    )
    return {
        "serve_warmup_s": warm.seconds,
        "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / (total_s - prefill_s),
        "median_step_ms": 1e3 * float(np.median(steps)),
    }


def finetune(model, mesh, args) -> dict:
    """Fine-tuning throughput of unified steps over ``model`` (on ``mesh``, if any); its
    tables are trained in place."""
    optimizer = SlotOptimizer(adamw(2e-5))
    graphdef, frozen, params = split_model(model)
    state = TrainState.create(params, optimizer)
    step = make_unified_step(graphdef, optimizer)
    num_rows = args.adapters * args.seqs * args.seq_len
    placement = None if mesh is None else replicated(mesh)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size

    def batch():
        return random_training_batch(
            rng, vocab, args.adapters, args.seqs, args.seq_len, NUM_SLOTS, placement
        )

    with Timer() as warm:
        for _ in range(2):
            state, _, out = step(frozen, state, batch(), None)
            float(out.loss[0])
    batches = [batch() for _ in range(args.steps)]
    with Timer() as timed:
        for b in batches:
            state, _, out = step(frozen, state, b, None)
            losses = np.asarray(out.loss)  # a training loop logs its losses
    assert np.isfinite(losses[: args.adapters]).all(), losses
    devices = jax.devices()[:1] if mesh is None else mesh.devices.flat
    in_use = [(d.memory_stats() or {}).get("bytes_in_use") for d in devices]
    nnx.update(model, state.params)  # the steps donated the model's table buffers
    return {
        "train_rows": num_rows,
        "train_warmup_s": warm.seconds,
        "train_tokens_per_s": num_rows * args.steps / timed.seconds,
        "mem_gib": None if None in in_use else max(in_use) / GIB,
    }


def measure(meshes: list[str], args, rows: Rows) -> None:
    """Serving and fine-tuning on each mesh of ``meshes``, in order, one model moved from
    mesh to mesh; speedups over "1" when it comes first."""
    model = random_model(CONFIGS[args.config])
    add_lora_tables(model, num_slots=NUM_SLOTS, max_rank=MAX_RANK)
    registry = AdapterRegistry(model)
    names = load_adapters(registry, model, 4)
    baseline = None
    for name in meshes:
        mesh = mesh_named(name)
        if mesh is not None:
            shard_model(model, mesh)
        data, width = parse_mesh(name) or (1, 1)
        row = {**serve(model, registry, names, args), **finetune(model, mesh, args)}
        if name == "1":
            baseline = row
        if baseline is not None:
            row["decode_speedup"] = row["decode_tokens_per_s"] / baseline["decode_tokens_per_s"]
            row["train_speedup"] = row["train_tokens_per_s"] / baseline["train_tokens_per_s"]
        rows.add(
            variant="measure",
            config=args.config,
            mesh=name,
            devices=data * width,
            data=data,
            model=width,
            batch=args.batch,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            seq_len=args.seq_len,
            **row,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="8b")
    parser.add_argument("--meshes", nargs="*", default=None, help='"1" or DxM; see above')
    parser.add_argument("--check-meshes", nargs="*", default=None, help="DxM; see above")
    parser.add_argument("--batch", type=int, default=None, help="serving requests")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prefill-capacity", type=int, default=None)
    parser.add_argument("--adapters", type=int, default=2, help="slots fine-tuned at once")
    parser.add_argument("--seqs", type=int, default=2, help="sequences per slot and step")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed fine-tuning steps")
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    tiny = args.config == "tiny"
    for name, big, small in [
        ("batch", 64, 8),
        ("prompt_len", 128, 8),
        ("new_tokens", 64, 4),
        ("prefill_capacity", 2048, 32),
        ("seq_len", 1024, 16),
        ("steps", 5, 2),
    ]:
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else big)
    meshes = default_meshes(jax.device_count()) if args.meshes is None else args.meshes
    if "1" in meshes[1:]:
        parser.error('"1" must come first: a sharded model does not go back to one device')
    check_meshes = args.check_meshes
    if check_meshes is None:
        check_meshes = [m for m in meshes if m != "1"]
    rows = Rows("scaling", args.out)

    passed = check(check_meshes, rows) if check_meshes else True
    if meshes:
        measure(meshes, args, rows)
    rows.table(
        [
            "variant",
            "mesh",
            "outputs_max_rel_err",
            "grads_max_rel_err",
            "same_tokens",
            "decode_tokens_per_s",
            "decode_speedup",
            "median_step_ms",
            "train_tokens_per_s",
            "train_speedup",
            "serve_warmup_s",
            "train_warmup_s",
            "mem_gib",
        ]
    )
    if not passed:
        sys.exit("a sharded check failed: see the check rows")


if __name__ == "__main__":
    main()
