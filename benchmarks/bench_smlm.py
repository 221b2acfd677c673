"""Benchmark of the SMLM Pallas kernels against XLA baselines on a GPU.

  PYTHONPATH=. python benchmarks/bench_smlm.py --table --tokens 4096 16384  # the results table
  PYTHONPATH=. python benchmarks/bench_smlm.py --profile   # kernels' device time, from a trace
  PYTHONPATH=. python benchmarks/bench_smlm.py --harness   # the timing harness's own floor
  PYTHONPATH=. python benchmarks/bench_smlm.py --sweep     # block-size sweep, one shape

Correctness on the GPU is the test suite's job: ``pytest tests/test_smlm.py -k gpu``.

Times are per call: one jit runs ``--iters`` calls in a chain (``chained``), rotating over
input sets larger than the L2 cache; median of ``--repeats`` runs. The memory floor is
the bytes an ideal fused kernel must move, over a device copy's bandwidth measured in
the same run (bytes read + written).

Baselines: ``ragged_dot`` (XLA's grouped matmul; groups must be contiguous),
``loop`` (one dense masked ``x @ A_n @ B_n`` per active adapter over all rows),
``dense1`` (a single adapter for every row: two dense matmuls, the cost of
LoRA with no multi-adapter machinery).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import glob
import gzip
import json
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import (
    plan_row_tiles,
    plan_slot_chunks,
    segment_expand,
    segment_outer,
    segment_shrink,
    smlm,
)

TABLE_SLOTS = 32  # slots in the adapter table; active adapters are a prefix


def layout(num_rows: int, active: int, num_segments: int):
    """Rows split evenly into ``active`` contiguous segments, slots 0..active-1."""
    active = min(active, num_rows)
    ends = np.linspace(0, num_rows, active + 1).astype(np.int32)[1:]
    seg_ends = np.full((num_segments,), num_rows, np.int32)
    seg_slots = np.full((num_segments,), -1, np.int32)
    seg_ends[:active], seg_slots[:active] = ends, np.arange(active)
    group_sizes = np.zeros((TABLE_SLOTS,), np.int32)
    group_sizes[:active] = np.diff(np.concatenate([[0], ends]))
    return jnp.asarray(seg_ends), jnp.asarray(seg_slots), jnp.asarray(group_sizes), active


def make_inputs(key, num_rows, d, rank, dtype):
    ks = jax.random.split(key, 5)
    x = jax.random.normal(ks[0], (num_rows, d), dtype)
    a = (jax.random.normal(ks[1], (TABLE_SLOTS, d, rank), jnp.float32) / np.sqrt(d)).astype(dtype)
    b = (jax.random.normal(ks[2], (TABLE_SLOTS, rank, d), jnp.float32) / np.sqrt(rank)).astype(
        dtype
    )
    base = jax.random.normal(ks[3], (num_rows, d), dtype)
    scale = jnp.full((TABLE_SLOTS,), 2.0, jnp.float32)
    g = jax.random.normal(ks[4], (num_rows, d), dtype)
    return x, a, b, base, scale, g


# --- the methods: y = base + scale * lora(x) ---------------------------------


def ours_fwd(x, a, b, base, scale, seg_ends, seg_slots, group_sizes):
    return smlm(x, a, b, scale, seg_ends, seg_slots, base)


def ragged_fwd(x, a, b, base, scale, seg_ends, seg_slots, group_sizes):
    h = lax.ragged_dot(x, a, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    y = lax.ragged_dot(h, b, group_sizes, preferred_element_type=jnp.float32)
    row_scale = jnp.repeat(scale, group_sizes, total_repeat_length=x.shape[0])
    return (base + y * row_scale[:, None]).astype(base.dtype)


def loop_fwd(x, a, b, base, scale, seg_ends, seg_slots, group_sizes, active):
    bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes)])
    row = jnp.arange(x.shape[0])
    y = base.astype(jnp.float32)
    for n in range(active):
        mask = (row >= bounds[n]) & (row < bounds[n + 1])
        h = (x @ a[n]).astype(x.dtype)
        y = y + jnp.where(mask[:, None], (h @ b[n]).astype(jnp.float32) * scale[n], 0)
    return y.astype(base.dtype)


def dense1_fwd(x, a, b, base, scale, seg_ends, seg_slots, group_sizes):
    h = (x @ a[0]).astype(x.dtype)
    return (base + (h @ b[0]).astype(jnp.float32) * scale[0]).astype(base.dtype)


def chained(fn, iters):
    """jit of ``iters`` calls of ``fn(*sets[i % len(sets)], *shared)``.

    An optimization barrier ties each call's inputs to the previous call's
    outputs, so XLA can neither merge the calls (CSE) nor reorder them, and every
    output is returned, so none is dropped; no data moves. One dispatch covers
    all the calls. Rotating over input sets larger than the L2 cache makes every
    call read its operands from HBM. ``shared`` inputs (the segment metadata)
    bypass the barrier, so work derived from them alone (the row-tile plans) is
    done once per run, as in a model whose layers all share one plan.
    """

    def run(sets, shared):
        outs = [None]
        for i in range(iters):
            sets, _ = lax.optimization_barrier((sets, outs[-1]))
            outs.append(fn(*sets[i % len(sets)], *shared))
        return outs[1:]

    return jax.jit(run)


L2_FLUSH_BYTES = 200 * 2**20  # rotate over at least this much data (H100 L2: 50 MB)


def input_sets(make, set_bytes):
    """Enough distinct input sets (``make(i)``) to cover ``L2_FLUSH_BYTES``."""
    count = int(np.clip(np.ceil(L2_FLUSH_BYTES / set_bytes), 2, 16))
    return [make(i) for i in range(count)]


def time_chained(fn, sets, iters, repeats, shared=()):
    """Median time of one call of ``fn`` in µs, over ``repeats`` chained runs."""
    iters = max(iters, len(sets))
    run = chained(fn, iters)
    jax.block_until_ready(run(sets, shared))
    return time_run(run, sets, shared, iters, repeats)


def time_run(run, sets, shared, iters, repeats):
    """Median time in µs of one of the ``iters`` calls of a compiled ``chained`` run."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(sets, shared))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times) * 1e6


def bench_forward(method, sets, meta, iters, repeats):
    """Time of ``y = method(...)``; the segment plan is shared (see ``chained``)."""
    return time_chained(method, [s[:5] for s in sets], iters, repeats, shared=meta)


def bench_train(method, sets, meta, iters, repeats):
    """Time of the forward and the VJP w.r.t. (x, a, b) together."""

    def train(x, a, b, base, scale, g, *meta):
        y, vjp = jax.vjp(lambda x, a, b: method(x, a, b, base, scale, *meta), x, a, b)
        return y, vjp(g)

    return time_chained(train, sets, iters, repeats, shared=meta)


def bench_plan(num_rows, meta, iters, repeats):
    """Time of the row-tile and chunk plans that one SMLM forward+backward uses
    (computed once per batch and shared by every layer)."""

    def plans(seg_ends, seg_slots):
        fwd = plan_row_tiles(seg_ends, seg_slots, num_rows, TABLE_SLOTS, 16)
        tiles = plan_row_tiles(seg_ends, seg_slots, num_rows, TABLE_SLOTS, 64)
        return fwd, tiles, plan_slot_chunks(tiles, TABLE_SLOTS, 8)

    sets = [(meta[0] + 0 * i, meta[1]) for i in range(2)]
    return time_chained(plans, sets, iters, repeats)


def measure_copy_bandwidth(iters, repeats):
    """Device copy bandwidth in bytes/s (read + write), with the same harness."""
    size = 64 * 2**20  # float32 elements: 256 MiB per buffer
    sets = [(jnp.full((size,), i, jnp.float32),) for i in range(4)]
    seconds = time_chained(lambda v: v + 1, sets, iters, repeats) * 1e-6
    return 2 * 4 * size / seconds


def set_bytes(inputs):
    return sum(v.nbytes for v in inputs)


def floor_bytes(num_rows, d, rank, active, itemsize, backward):
    rows = num_rows * d * itemsize
    weights = 2 * active * d * rank * itemsize
    if backward:  # read g, read x, write dx; read A, B; write dA, dB (whole table)
        return 3 * rows + weights + 2 * TABLE_SLOTS * d * rank * itemsize
    return 3 * rows + weights  # read x, read base, write y; read A, B


# --- block-size sweep and table -------------------------------------------------


def _random_inputs(i, *, num_rows, d, rank):
    """Input set ``i`` of ``make_inputs`` in bf16."""
    return make_inputs(jax.random.key(i), num_rows, d, rank, jnp.bfloat16)


def _random_rows(i, *, num_rows):
    """Input set ``i``: one [T, 4096] bf16 array."""
    return (jax.random.normal(jax.random.key(i), (num_rows, 4096), jnp.bfloat16),)


def sweep(args):
    num_rows, d, rank, active = 4096, 4096, 16, 8
    make = functools.partial(_random_inputs, num_rows=num_rows, d=d, rank=rank)
    sets = input_sets(make, set_bytes(make(0)))
    x, a, b, base, scale, g = sets[0]
    seg_ends, seg_slots, _, _ = layout(num_rows, active, 64)
    bw = measure_copy_bandwidth(args.iters, args.repeats)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")

    def run(name, fn, floor_bytes):
        try:
            t = time_chained(fn, sets, args.iters, args.repeats)
            print(f"{name:45s} {t:8.1f} us  floor {floor_bytes / bw * 1e6:6.1f} us", flush=True)
        except Exception as e:  # a configuration Triton cannot compile
            print(f"{name:45s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)

    h = segment_shrink(x, a, seg_ends, seg_slots)  # one h for all sets: it is 128 KiB
    for br in (16, 32, 64):
        for bk in (128, 256):
            for nw, ns in ((4, 3), (4, 4), (8, 3)):

                def fn(x, a, b, base, scale, g, br=br, bk=bk, nw=nw, ns=ns):
                    return segment_shrink(
                        x,
                        a,
                        seg_ends,
                        seg_slots,
                        block_rows=br,
                        block_k=bk,
                        num_warps=nw,
                        num_stages=ns,
                    )

                run(f"shrink br={br} bk={bk} warps={nw} stages={ns}", fn, x.nbytes)
    for br in (16, 32, 64):
        for bd in (64, 128, 256):
            for nw in (4, 8):

                def fn(x, a, b, base, scale, g, br=br, bd=bd, nw=nw):
                    return segment_expand(
                        h,
                        b,
                        seg_ends,
                        seg_slots,
                        scale,
                        base,
                        block_rows=br,
                        block_d=bd,
                        num_warps=nw,
                    )

                run(f"expand br={br} bd={bd} warps={nw}", fn, 2 * x.nbytes)
    for br in (32, 64, 128):
        for bp, bq in ((32, 16), (64, 16), (128, 16), (16, 64), (16, 128)):
            for nw in (4, 8):
                transposed_operands = bq != 16  # dB-like: lhs = h [T, R], rhs = g [T, D]

                def fn(x, a, b, base, scale, g, br=br, bp=bp, bq=bq, nw=nw, t=transposed_operands):
                    return segment_outer(
                        h if t else x,
                        g if t else h,
                        seg_ends,
                        seg_slots,
                        num_slots=TABLE_SLOTS,
                        block_rows=br,
                        block_p=bp,
                        block_q=bq,
                        num_warps=nw,
                    )

                kind = "dB" if transposed_operands else "dA"
                run(f"outer {kind} br={br} bp={bp} bq={bq} warps={nw}", fn, x.nbytes)


def trace_kernel_times(run, *args) -> dict[str, list[float]]:
    """Durations in µs of every kernel on a GPU stream during ``run(*args)``,
    by kernel name, from a profiler trace; empty when no GPU stream ran (CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready(run(*args))
        [path] = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    names = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")
    }
    per_kernel = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "Stream" in names.get((e.get("pid"), e.get("tid")), ""):
            per_kernel[e["name"]].append(e["dur"])
    return dict(per_kernel)


def profile(args):
    """Device time of every kernel of one forward+backward (``ours``), from a
    profiler trace: the kernels' own time, without launch gaps or host work."""
    for num_rows, rank, active in [(t, 16, 8) for t in args.tokens]:
        make = functools.partial(_random_inputs, num_rows=num_rows, d=4096, rank=rank)
        sets = input_sets(make, set_bytes(make(0)))
        meta = layout(num_rows, active, 64)[:3]
        iters = max(args.iters, len(sets))
        for label, fn in (("fwd", ours_fwd), ("fwd+bwd", None)):
            if fn is None:

                def fn(x, a, b, base, scale, g, *meta):
                    y, vjp = jax.vjp(lambda x, a, b: ours_fwd(x, a, b, base, scale, *meta), x, a, b)
                    return y, vjp(g)

                inputs = sets
            else:
                inputs = [s[:5] for s in sets]
            run = chained(fn, iters)
            jax.block_until_ready(run(inputs, meta))
            per_kernel = trace_kernel_times(run, inputs, meta)
            if not per_kernel:
                print("no GPU stream in the trace")
                continue
            total = sum(sum(v) for v in per_kernel.values()) / iters
            print(f"T={num_rows} r={rank} n={active} {label}: {total:.1f} us of kernels per call")
            for name, durs in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1])):
                calls, median = len(durs) / iters, statistics.median(durs)
                print(f"    {name[:60]:60s} x{calls:4.1f}  {median:7.1f} us")


def harness(args):
    """The harness's own floor: one elementwise pass over a [T, 4096] bf16 array
    (read + write), timed exactly like the kernels."""
    bw = measure_copy_bandwidth(args.iters, args.repeats)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for num_rows in args.tokens:
        make = functools.partial(_random_rows, num_rows=num_rows)
        sets = input_sets(make, set_bytes(make(0)))
        t = time_chained(lambda v: v * 2, sets, args.iters, args.repeats)
        floor = 2 * sets[0][0].nbytes / bw * 1e6
        print(f"T={num_rows:6d}  v*2: {t:7.1f} us  floor {floor:7.1f} us")


def table(args):
    bw = measure_copy_bandwidth(args.iters, args.repeats)
    rows = []
    configs = [
        (t, r, n) for t in args.tokens for r, n in ((16, 1), (16, 8), (16, 32), (8, 8), (64, 8))
    ]
    for num_rows, rank, active in configs:
        d = 4096
        make = functools.partial(_random_inputs, num_rows=num_rows, d=d, rank=rank)
        sets = input_sets(make, set_bytes(make(0)))
        seg_ends, seg_slots, group_sizes, active = layout(num_rows, active, 64)
        meta = (seg_ends, seg_slots, group_sizes)
        methods = {
            "ours": ours_fwd,
            "ragged_dot": ragged_fwd,
            "loop": functools.partial(loop_fwd, active=active),
            "dense1": dense1_fwd,
        }
        row = dict(T=num_rows, d=d, r=rank, adapters=active)
        row["plan"] = bench_plan(num_rows, meta[:2], args.iters, args.repeats)
        for direction in ("fwd", "bwd"):
            row[f"{direction}_floor"] = (
                floor_bytes(num_rows, d, rank, active, 2, direction == "bwd") / bw * 1e6
            )
        for name, method in methods.items():
            row[f"fwd_{name}"] = bench_forward(method, sets, meta, args.iters, args.repeats)
            row[f"train_{name}"] = bench_train(method, sets, meta, args.iters, args.repeats)
            row[f"bwd_{name}"] = row[f"train_{name}"] - row[f"fwd_{name}"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print_table(rows, bw)
    return rows


def print_table(rows, bw):
    print(
        f"\n{datetime.date.today()}  {jax.devices()[0].device_kind}  jax {jax.__version__}  "
        f"copy {bw / 1e12:.2f} TB/s  bf16, d=4096, table of {TABLE_SLOTS} slots; times in µs"
    )
    head = (
        "T",
        "r",
        "n",
        "plan",
        "fwd ours",
        "floor",
        "x floor",
        "ragged",
        "vs ragged",
        "loop",
        "dense1",
        "bwd ours",
        "floor",
        "x floor",
        "ragged",
        "vs ragged",
        "loop",
        "dense1",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["T"], r["r"], r["adapters"], f"{r['plan']:.1f}"]
        for dn in ("fwd", "bwd"):
            ours, floor = r[f"{dn}_ours"], r[f"{dn}_floor"]
            cells += [
                f"{ours:.1f}",
                f"{floor:.1f}",
                f"{ours / floor:.2f}",
                f"{r[f'{dn}_ragged_dot']:.1f}",
                f"{r[f'{dn}_ragged_dot'] / ours:.1f}x",
                f"{r[f'{dn}_loop']:.1f}",
                f"{r[f'{dn}_dense1']:.1f}",
            ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--harness", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[16, 256, 4096, 16384],
        help="table: the values of T",
    )
    parser.add_argument("--json", help="write the table rows here")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if args.sweep:
        sweep(args)
    if args.harness:
        harness(args)
    if args.profile:
        profile(args)
    if args.table:
        rows = table(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
