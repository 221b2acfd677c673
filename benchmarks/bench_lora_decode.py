"""Multi-LoRA decode: one Llama-3-8B layer's LoRA forward, two ways, on a GPU.

  PYTHONPATH=. python benchmarks/bench_lora_decode.py            # the table
  PYTHONPATH=. python benchmarks/bench_lora_decode.py --sweep --tokens 64 --adapters 64  # tunables
  PYTHONPATH=. python benchmarks/bench_lora_decode.py --smoke    # tiny, interpreted (CPU)

A layer is q, k, v, o (4096 -> 4096/1024/1024/4096), gate, up (4096 -> 14336)
and down (14336 -> 4096), each ``base + scale * (x @ A) @ B`` over an adapter
table of 64 slots of rank ``--rank`` (8), 64 segments, bf16; ``T`` rows are
split evenly into one segment per active adapter (slots ``0..n-1``). Methods:

* ``two-kernel``: shrink then expand per projection (``smlm`` above
  ``SMALL_BATCH_ROWS``): 14 launches, plus the shrink's split-K sums.
* ``split``: the model's small-batch path per group {q, k, v}, {o}, {gate, up},
  {down}: ``lora_split``'s split-K shrink and expand (8 launches) writing float32
  adapter terms that XLA adds to the bases, on row tiles planned once (as a model
  plans them once per step).

(``lora_group``, one launch per group with each program streaming all of ``K``,
was measured here at 30-90 µs a launch and deleted; RESULTS.md, runs 5-6.)

Reported per layer: the kernels' device time from a profiler trace (like
``bench_smlm.py --profile``; kernels that run once per chain, i.e. the segment
plans, which a model computes once per step for all layers, are listed apart),
the time per call in the chained harness of ``bench_smlm.py`` (launch gaps
included), both times 32 layers, and the largest relative error of the
layer's outputs against ``smlm_reference`` (float32). Calls rotate over up to
32 layers' worth of tables (like the model's 32 layers) until the adapters'
weights they touch pass 200 MB; with one adapter the 32 layers touch only
~42 MB (r = 8), which may stay in L2, so those times are optimistic: in the
model, the base layers' weights stream through L2 between LoRA calls.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import (
    lora_split_forward,
    plan_forward,
    segment_expand,
    segment_shrink,
    smlm_reference,
)

from bench_smlm import chained, time_run, trace_kernel_times

LAYERS = 32  # Llama-3-8B
L2_FLUSH_BYTES = 200 * 2**20  # rotate until the touched weights pass this (H100/H200 L2: 50 MB)
TOLERANCE = 1e-2  # bf16


def projections(hidden: int, kv: int, ffn: int) -> dict[str, tuple[str, int, int]]:
    """name -> (its input, d_in, d_out)."""
    return {
        "q": ("attn", hidden, hidden),
        "k": ("attn", hidden, kv),
        "v": ("attn", hidden, kv),
        "o": ("o", hidden, hidden),
        "gate": ("mlp", hidden, ffn),
        "up": ("mlp", hidden, ffn),
        "down": ("down", ffn, hidden),
    }


GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
METHODS = ["two-kernel", "split"]


def layout(num_rows: int, active: int, num_segments: int):
    """Rows split evenly into ``active`` contiguous segments, slots ``0..active-1``."""
    active = min(active, num_rows)
    seg_ends = np.full((num_segments,), num_rows, np.int32)
    seg_slots = np.full((num_segments,), -1, np.int32)
    seg_ends[:active] = np.linspace(0, num_rows, active + 1).astype(np.int32)[1:]
    seg_slots[:active] = np.arange(active)
    return (jnp.asarray(seg_ends), jnp.asarray(seg_slots)), active


def make_layer(key, shapes, num_rows, num_slots, rank):
    """One layer's ``(xs, tables, bases)``: inputs by name, per-projection tables and bases."""
    dtype = jnp.bfloat16
    keys = iter(jax.random.split(key, 4 + 3 * len(shapes)))
    inputs = {src: d_in for src, d_in, _ in shapes.values()}
    xs = {src: jax.random.normal(next(keys), (num_rows, d), dtype) for src, d in inputs.items()}
    tables, bases = {}, {}
    for name, (_, d_in, d_out) in shapes.items():
        a = jax.random.normal(next(keys), (num_slots, d_in, rank), jnp.float32) / np.sqrt(d_in)
        b = jax.random.normal(next(keys), (num_slots, rank, d_out), jnp.float32) / np.sqrt(rank)
        tables[name] = (a.astype(dtype), b.astype(dtype), jnp.full((num_slots,), 2.0))
        bases[name] = jax.random.normal(next(keys), (num_rows, d_out), dtype)
    return xs, tables, bases


def touched_bytes(shapes, num_rows, active, rank) -> int:
    """Bytes one layer call must read or write: active adapters' weights, rows."""
    weights = sum(active * rank * (d_in + d_out) for _, d_in, d_out in shapes.values())
    rows = sum(num_rows * (d_in + 2 * d_out) for _, d_in, d_out in shapes.values())
    return 2 * (weights + rows)


# --- the methods: every projection of one layer --------------------------------


def two_kernel(shapes, xs, tables, bases, seg_ends, seg_slots):
    ys = {}
    for name, (src, _, _) in shapes.items():
        a, b, scale = tables[name]
        h = segment_shrink(xs[src], a, seg_ends, seg_slots)
        ys[name] = segment_expand(h, b, seg_ends, seg_slots, scale, bases[name])
    return ys


def split(shapes, xs, tables, bases, seg_ends, seg_slots, **tunables):
    """What ``smlm_group`` does at these sizes (``smlm._small_batch_forward``), with
    ``lora_split``'s tunables: float32 adapter terms, added to the bases by XLA."""
    num_rows, num_slots = xs["attn"].shape[0], tables["q"][0].shape[0]
    tiles = plan_forward(seg_ends, seg_slots, num_rows, num_slots)
    assert tiles is not None, f"T = {num_rows} is above SMALL_BATCH_ROWS"
    ys = {}
    for group in GROUPS:
        terms = lora_split_forward(
            xs[shapes[group[0]][0]],
            [tables[name] for name in group],
            [None] * len(group),
            seg_ends,
            seg_slots,
            tiles,
            out_dtype=jnp.float32,
            **tunables,
        )
        for name, term in zip(group, terms, strict=True):
            ys[name] = (bases[name].astype(jnp.float32) + term).astype(bases[name].dtype)
    return ys


def methods(shapes, tunables):
    return {
        "two-kernel": (14, functools.partial(two_kernel, shapes)),
        "split": (2 * len(GROUPS), functools.partial(split, shapes, **tunables)),
    }


def max_error(ys, shapes, layer, meta) -> float:
    """Largest relative error of a layer's outputs against the float32 reference."""
    xs, tables, bases = layer
    errors = []
    for name, (src, _, _) in shapes.items():
        (a, b, scale), f32 = tables[name], lambda v: v.astype(jnp.float32)
        want = smlm_reference(f32(xs[src]), f32(a), f32(b), scale, *meta, f32(bases[name]))
        got, want = np.asarray(ys[name], np.float64), np.asarray(want, np.float64)
        errors.append(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    return float(max(errors))


def measure(run, layers, meta, iters, repeats) -> tuple[dict, dict]:
    """Per-call time and the kernels' device time of a ``chained`` run, per layer;
    and the outputs of its first call (``layers[0]``)."""
    outs = jax.block_until_ready(run(layers, meta))  # compiles
    row = {"per_call": time_run(run, layers, meta, iters, repeats)}
    per_kernel = trace_kernel_times(run, layers, meta)
    if per_kernel:
        # A kernel that runs less than once per call is shared by the chain: the plans.
        per_call = {k: v for k, v in per_kernel.items() if len(v) >= iters}
        row["kernels"] = sum(sum(v) for v in per_call.values()) / iters
        row["plan"] = sum(sum(v) for k, v in per_kernel.items() if k not in per_call)
        row["per_kernel"] = {
            k: (len(v) / iters, statistics.median(v))
            for k, v in sorted(per_call.items(), key=lambda kv: -sum(kv[1]))
        }
    return row, outs[0]


def table(args, config, tunables, names) -> list[dict]:
    """Rows of the given methods at every (T, adapters) of ``args``."""
    shapes = projections(*config["dims"])
    layer_methods = {k: v for k, v in methods(shapes, tunables).items() if k in names}
    runs = {}  # (method, calls) -> chained jit: layouts of one T share its compile
    rows = []
    done = set()
    for num_rows, adapters in itertools.product(args.tokens, args.adapters):
        meta, active = layout(num_rows, adapters, config["segments"])
        if (num_rows, active) in done:  # more adapters than rows: one row each, as before
            continue
        done.add((num_rows, active))
        wanted = L2_FLUSH_BYTES / touched_bytes(shapes, num_rows, active, args.rank)
        count = min(max(2, int(np.ceil(wanted))), config["max_layers"])
        layers = [
            make_layer(jax.random.key(i), shapes, num_rows, config["slots"], args.rank)
            for i in range(count)
        ]
        iters = max(args.iters, count)
        for name, (launches, fn) in layer_methods.items():
            run = runs.setdefault((name, iters), chained(fn, iters))
            row = dict(T=num_rows, adapters=active, method=name, launches=launches)
            measured, ys = measure(run, layers, meta, iters, args.repeats)
            row.update(measured, error=max_error(ys, shapes, layers[0], meta))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def print_table(rows, config, rank):
    print(
        f"\n{datetime.date.today()}  {jax.devices()[0].device_kind}  jax {jax.__version__}  "
        f"bf16, dims {config['dims']}, {config['slots']} slots of rank {rank}, "
        f"{config['segments']} segments; times in µs per layer"
    )
    head = ("T", "n", "method", "launches", "kernels", f"x{LAYERS}", "vs two-kernel")
    head += ("per call", f"x{LAYERS}", "plan", "max rel err")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    baseline = {(r["T"], r["adapters"]): r for r in rows if r["method"] == "two-kernel"}
    for r in rows:
        kernels = r.get("kernels")
        base = baseline.get((r["T"], r["adapters"]), {}).get("kernels")
        cells = [r["T"], r["adapters"], r["method"], r["launches"]]
        if kernels is None:  # no GPU stream in the trace
            cells += ["-", "-", "-"]
        else:
            speedup = f"{base / kernels:.2f}x" if base else "-"
            cells += [f"{kernels:.1f}", f"{kernels * LAYERS:.0f}", speedup]
        cells += [f"{r['per_call']:.1f}", f"{r['per_call'] * LAYERS:.0f}"]
        cells += ["-" if "plan" not in r else f"{r['plan']:.1f}"]
        flag = "" if r["error"] < TOLERANCE else " FAIL"
        cells += [f"{r['error']:.1e}{flag}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if any("kernels" not in r for r in rows):
        print("No GPU stream in the traces: interpreted kernels, times say nothing.")
    for r in rows:
        if "per_kernel" in r:
            print(f"T={r['T']} n={r['adapters']} {r['method']}:")
            for name, (calls, median) in r["per_kernel"].items():
                print(f"    {name[:60]:60s} x{calls:4.1f}  {median:7.1f} us")


def sweep(args, config):
    """Kernel time of ``split`` over its tunables, at each (T, adapters)."""
    grid = list(itertools.product((256, 512, 1024), (1, 2), (128, 256), (1, 2, 4)))
    for block_k, blocks_per_split, block_n, sub_blocks in grid[:2] if args.smoke else grid:
        tunables = dict(
            block_k=block_k,
            blocks_per_split=blocks_per_split,
            block_n=block_n,
            sub_blocks=sub_blocks,
        )
        try:
            rows = table(args, config, tunables, ["split"])
        except Exception as e:  # a configuration Triton cannot compile
            print(f"{tunables}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        for r in rows:
            kernels = r.get("kernels", float("nan"))
            print(
                f"T={r['T']} n={r['adapters']} {tunables}: kernels {kernels:.1f} us, "
                f"per call {r['per_call']:.1f} us, error {r['error']:.1e}",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted")
    parser.add_argument("--sweep", action="store_true", help="lora_split's tunables")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=METHODS, help="table: which methods"
    )
    parser.add_argument("--rank", type=int, default=8, help="the tables' (padded) rank")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the table rows here")
    args = parser.parse_args()
    config = dict(dims=(4096, 1024, 14336), slots=64, segments=64, max_layers=LAYERS)
    if args.smoke:
        config = dict(dims=(64, 32, 160), slots=8, segments=8, max_layers=1)
        args.tokens, args.adapters, args.iters, args.repeats = [16], [1, 4], 1, 1
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if args.sweep:
        sweep(args, config)
        return
    rows = table(args, config, {}, args.methods)
    print_table(rows, config, args.rank)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if any(r["error"] >= TOLERANCE for r in rows):
        sys.exit("some outputs differ from the reference")


if __name__ == "__main__":
    main()
