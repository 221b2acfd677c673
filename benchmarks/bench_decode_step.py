"""Where a decode step's time goes: the serving step of the Llama-3-8B shape, on and off
the host, base model against multi-LoRA, kernel by kernel.

  PYTHONPATH=. python benchmarks/bench_decode_step.py --out benchmarks/results/decode_step.jsonl
  PYTHONPATH=. python benchmarks/bench_decode_step.py --tiny   # every path, on a CPU

B requests (``--batch``, default 64) of 16 random prompt ids are prefilled and then held in
decode; per variant it reports, per decode step of ``B`` rows:

* ``engine``: median wall time of ``Engine.step`` (host scheduling, packing, the transfer,
  the sync on the next tokens and the bookkeeping included);
* ``device``: median wall time of the jitted serving step alone on one packed decode batch,
  ``--iters`` calls back to back with one sync at the end (dispatch and the engine's read
  of its serving leaves included, no other host work between steps), and ``dispatch``,
  the host's share of it: the time those calls take to return before the sync;
* ``kernels``: the GPU kernels' summed time per step from a profiler trace of those calls
  (a traced run launches kernel by kernel, without command buffers), their number, and
  the top kernels (calls per step, ms per step, and the time the stream sat idle before
  them; ``--top`` of them by time and by idle time in the JSON row, 12 printed); ``traced_idle`` and
  ``traced_span`` are the stream's idle time and first-to-last span per step in that
  trace. ``--hlo-dir`` also writes each variant's compiled step (HLO text, gzipped), to
  read what a kernel of the trace computes. ``--phases`` adds ``Engine.step``'s host parts
  (``bench_common.step_phases``) and the device step fed other batches than one re-run (``FEEDS``).

Variants: ``base`` (no adapter tables), then the model with 64-slot rank-8 tables (all seven
projections) and 64 adapters loaded, serving ``n`` of them (request i gets adapter
``i % n``), once per LoRA decode path of ``--paths`` (``pallas_kernels.smlm``'s
``SMALL_BATCH_ROWS`` picks it at trace time, so every path compiles afresh) and per
command-buffer schedule of ``--schedules`` (``SCHEDULES``: the serving step's own,
CONCURRENT, or XLA's default; under CONCURRENT the traced kernels overlap, so ``kernels``
can exceed ``traced_span``). ``temp_mib`` is the compiled step's temporaries.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import pathlib
import statistics
import time

import jax
import numpy as np

from loqjax import AdapterRegistry, Engine, EngineConfig, SamplingParams, add_lora_tables
from loqjax.serve_step import ServeBatch, serve_step

from bench_common import (
    Rows,
    kernel_profile,
    load_adapters,
    measure_ceilings,
    model_config,
    num_matmul_params,
    random_model,
    step_phases,
)

MAX_SLOTS = 64
PROMPT_LEN = 16
# SMALL_BATCH_ROWS per decode path: "split" is a split-K shrink and an expand per
# projection group (lora_split), "two-kernel" a shrink and an expand per projection.
PATHS = {"split": 256, "two-kernel": 0}
# The module itself: the package's ``smlm`` attribute is the function of that name.
SMLM = importlib.import_module("pallas_kernels.smlm")
SERVE_STEP = importlib.import_module("loqjax.serve_step")
# The serving step's command-buffer schedule: the library's (CONCURRENT) or XLA's default.
SCHEDULES = {"concurrent": dict(SERVE_STEP.SERVING_COMPILER_OPTIONS), "lhs": {}}


def held_in_decode(engine: Engine, batch: int, adapters: list[str], seed: int) -> None:
    """Submits ``batch`` long requests and steps until every one is decoding."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    handles = [
        engine.submit(
            rng.integers(0, vocab, PROMPT_LEN).tolist(),
            adapters[i % len(adapters)] if adapters else None,
            params,
        )
        for i in range(batch)
    ]
    while not all(h.output().token_ids for h in handles):
        engine.step()


def engine_steps(engine: Engine, steps: int) -> float:
    """Median seconds of ``steps`` decode ``Engine.step`` calls."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def next_batch(engine: Engine) -> ServeBatch:
    """The engine's next step's batch, packed as ``Engine.step`` packs it (not stepped)."""
    return engine._batch(engine._schedule())


# How ``device_steps`` feeds its back-to-back steps: one packed batch re-run; 4 batches
# packed alike (the same values in other device buffers), cycled, which makes the step's
# command buffers (CUDA graphs, recorded for the buffers' addresses) update every call;
# or a batch packed and transferred afresh per call, as the engine does.
FEEDS = ("same", "cycled", "fresh")


def device_steps(engine: Engine, iters: int, repeats: int, feed: str = "same"):
    """(median seconds per step of ``iters`` back-to-back serving steps on the next decode
    step's batch, fed as ``feed`` says (see ``FEEDS``), median seconds per step the host
    takes to dispatch them, a function running ``iters`` of them); each call rewrites the
    same cache rows. Dispatch time near the step time means the host, not the GPU, sets
    the pace. The engine is not stepped afterwards."""
    scheduled = engine._schedule()
    packed = [engine._batch(scheduled) for _ in range(4 if feed == "cycled" else 1)]

    def batch(i: int) -> ServeBatch:
        return engine._batch(scheduled) if feed == "fresh" else packed[i % len(packed)]

    def run():
        tokens = None
        for i in range(iters):
            tokens, engine._cache = engine._serve_step(
                engine._serving_leaves(), engine._cache, batch(i)
            )
        return tokens

    jax.block_until_ready(run())
    times, dispatches = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        dispatches.append((time.perf_counter() - start) / iters)
        jax.block_until_ready(tokens)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times), statistics.median(dispatches), run


# Engine.step's parts, timed by wrapping the engine's methods of these names.
PHASES = {
    "schedule": "_schedule",
    "pack": "_batch",
    "pending": "_pending",
    "begin": "_begin",
    "leaves": "_serving_leaves",
    "dispatch": "_serve_step",
    "commit": "_commit",
}


def per_step(kernels: list[dict], iters: int) -> list[dict]:
    """Profile rows of ``iters`` steps, per step."""
    return [dict(k, **{f: k[f] / iters for f in ("calls", "total_ms", "idle_ms")}) for k in kernels]


def compiled_step(engine: Engine):
    """The engine's serving step compiled for its next batch (ahead of time: on a GPU run
    the persistent compilation cache makes it a lookup)."""
    batch = next_batch(engine)
    return engine._serve_step.lower(engine._serving_leaves(), engine._cache, batch).compile()


def write_hlo(compiled, path: pathlib.Path) -> None:
    """A compiled step as optimized HLO text, gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write(compiled.as_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--schedules", nargs="+", default=["concurrent"], choices=list(SCHEDULES))
    parser.add_argument("--steps", type=int, default=20, help="timed engine steps")
    parser.add_argument("--iters", type=int, default=10, help="device steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="kernels kept in the JSON row")
    parser.add_argument("--hlo-dir", default=None, help="write each compiled step here")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time Engine.step's parts and the device step under every feed (FEEDS)",
    )
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    config = model_config(args.tiny)
    rows = Rows("decode_step", args.out)
    ceilings = measure_ceilings(args.tiny)
    floor_ms = 2 * num_matmul_params(config) / (ceilings["copy_tb_per_s"] * 1e12) * 1e3
    rows.add(variant="ceilings", floor_step_ms=floor_ms, **ceilings)
    engine_config = EngineConfig(
        token_capacity=args.batch,
        max_seqs=args.batch,
        page_size=16,
        num_pages=args.batch * 8 + 1,
        max_seq_len=128,
        token_buckets=(args.batch,),
    )
    model = random_model(config)
    variants = [("base", 0, None)]
    variants += [(f"lora{n}", n, path) for path in args.paths for n in args.adapters]
    variants = [(*v, schedule) for v in variants for schedule in args.schedules]
    names: list[str] = []
    for variant, n, path, schedule in variants:
        if n and not names:  # the base is done: give the same model its tables
            add_lora_tables(model, num_slots=MAX_SLOTS, max_rank=8)
            registry = AdapterRegistry(model)
            names = load_adapters(registry, model, MAX_SLOTS)
        if path is not None:
            SMLM.SMALL_BATCH_ROWS = PATHS[path]
        SERVE_STEP.SERVING_COMPILER_OPTIONS = SCHEDULES[schedule]
        jax.clear_caches()  # the nested layer jits too: the path is read at trace time
        serve_step.cache_clear()
        engine = Engine(model, registry if n else None, config=engine_config)
        start = time.perf_counter()
        held_in_decode(engine, args.batch, names[:n], seed=1)
        engine_steps(engine, 2)  # compiles the decode bucket (prefill shares it)
        warm_s = time.perf_counter() - start
        engine_s = engine_steps(engine, args.steps)
        probes = {}
        if args.phases:
            probes = step_phases(engine, PHASES, args.steps)
            for feed in FEEDS[1:]:
                step_s, feed_dispatch_s, _ = device_steps(engine, args.iters, args.repeats, feed)
                probes[f"device_{feed}_ms"] = step_s * 1e3
                probes[f"dispatch_{feed}_ms"] = feed_dispatch_s * 1e3
        device_s, dispatch_s, run = device_steps(engine, args.iters, args.repeats)
        *kernels, every = kernel_profile(run, top=None)
        compiled = compiled_step(engine)
        if args.hlo_dir:
            write_hlo(compiled, pathlib.Path(args.hlo_dir) / f"{variant}_{path or 'base'}.hlo.gz")
        row = rows.add(
            variant=variant,
            path=path,
            schedule=schedule,
            n_adapters=n,
            batch=args.batch,
            warmup_s=warm_s,
            engine_step_ms=engine_s * 1e3,
            device_step_ms=device_s * 1e3,
            dispatch_ms=dispatch_s * 1e3,
            kernels_ms=every["total_ms"] / args.iters,
            kernels_per_step=every["calls"] / args.iters,
            traced_idle_ms=every["idle_ms"] / args.iters,
            traced_span_ms=every["span_ms"] / args.iters,
            floor_step_ms=floor_ms,
            temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
            top_kernels=per_step(kernels[: args.top], args.iters),
            top_idle_kernels=per_step(
                sorted(kernels, key=lambda k: -k["idle_ms"])[: args.top], args.iters
            ),
            **probes,
        )
        if probes:
            print(
                f"--- {variant} {path or ''} {schedule}: "
                + " ".join(f"{k}={v:.3f}" for k, v in probes.items())
            )
        for key in ("top_kernels", "top_idle_kernels"):
            print(
                f"--- {variant} {path or ''} {schedule}: {key.replace('_', ' ')} per step",
                flush=True,
            )
            for k in row[key][:12]:
                print(
                    f"    {k['kernel'][:60]:60s} x{k['calls']:6.1f} {k['total_ms']:8.3f} ms"
                    f"  idle before {k['idle_ms']:7.3f} ms"
                )
    rows.table(
        [
            "variant",
            "path",
            "schedule",
            "batch",
            "engine_step_ms",
            "device_step_ms",
            "dispatch_ms",
            "kernels_ms",
            "kernels_per_step",
            "traced_idle_ms",
            "traced_span_ms",
            "floor_step_ms",
            "temp_mib",
            "warmup_s",
        ]
    )


if __name__ == "__main__":
    main()
