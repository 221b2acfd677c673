"""Benchmark of packed flash attention (``pallas_kernels.packed_attention``) on a GPU.

  PYTHONPATH=. python benchmarks/bench_flash_attention.py --table   # layouts x methods
  PYTHONPATH=. python benchmarks/bench_flash_attention.py --sweep   # block sizes, one shape
      (the last of --tokens and --segments; fine-tuning's: --tokens 2048 --segments 2)
  PYTHONPATH=. python benchmarks/bench_flash_attention.py --smoke   # tiny, interpreted (CPU)

Correctness on the GPU is the test suite's job: ``pytest -m gpu tests/test_flash_attention.py``.

Times are µs per call from ``bench_smlm``'s chained harness (a jit of dependent calls
rotating over inputs larger than L2; median of ``--repeats``). TFLOP/s counts only the
useful (visible, causal) work: 4·D·Hq·Σ len·(len+1)/2 for the forward, 2.5x that for
the backward (five matmuls to the forward's two), so a packed layout and a dense one are
on one scale. Layouts: ``dense`` one sequence of T rows; ``packed N`` N sequences of T/N
rows (the block skipping should make ``packed 8`` cost ~1/8 of ``dense``).
Baselines: ``xla`` (``loqjax.attention.reference_attention``, materialised mask; only
for T <= 4096) and ``jax mha`` (``jax.experimental.pallas.ops.gpu.attention.mha``, dense
causal, no GQA: K/V repeated to Hq heads first, one segment only).
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from loqjax.attention import reference_attention
from pallas_kernels import packed_attention

import bench_smlm
from bench_smlm import input_sets, time_chained


def layout(num_rows: int, num_segments: int):
    """(positions, segment_ids) int32 [T]: ``num_segments`` equal sequences."""
    length = num_rows // num_segments
    positions = np.tile(np.arange(length), num_segments).astype(np.int32)
    return jnp.asarray(positions), jnp.asarray(np.repeat(np.arange(num_segments), length))


def useful_flops(num_rows, num_segments, heads, head_dim, window=None):
    length = num_rows // num_segments
    keys = np.minimum(np.arange(1, length + 1), window or length)  # keys per query
    return 4 * head_dim * heads * num_segments * int(keys.sum())


def make_sets(num_rows, heads, kv_heads, head_dim, dtype):
    def make(i):
        ks = jax.random.split(jax.random.key(i), 4)
        return (
            jax.random.normal(ks[0], (num_rows, heads, head_dim), dtype),
            jax.random.normal(ks[1], (num_rows, kv_heads, head_dim), dtype),
            jax.random.normal(ks[2], (num_rows, kv_heads, head_dim), dtype),
            jax.random.normal(ks[3], (num_rows, heads, head_dim), dtype),
        )

    first = make(0)
    return input_sets(make, sum(x.nbytes for x in first))


def ours(q, k, v, g, positions, segment_ids, *, backward, **kwargs):
    def attend(q, k, v):
        return packed_attention(q, k, v, positions, segment_ids, **kwargs)

    if not backward:
        return attend(q, k, v)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(g)


def xla(q, k, v, g, positions, segment_ids, *, backward, sliding_window=None):
    def attend(q, k, v):
        return reference_attention(
            q, k, v, positions, positions, segment_ids, segment_ids, sliding_window
        )

    if not backward:
        return attend(q, k, v)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(g)


def jax_mha(q, k, v, g, positions, segment_ids, *, backward, sliding_window=None):
    from jax.experimental.pallas.ops.gpu.attention import mha

    group = q.shape[1] // k.shape[1]

    def attend(q, k, v):
        k, v = (jnp.repeat(x, group, axis=1) for x in (k, v))
        out = mha(
            q[None],
            k[None],
            v[None],
            None,
            sm_scale=q.shape[-1] ** -0.5,
            causal=True,
            interpret=jax.default_backend() != "gpu",
        )
        return out[0]

    if not backward:
        return attend(q, k, v)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(g)


def measure(method, sets, meta, args, **kwargs):
    """(fwd µs, fwd+bwd µs) of ``method``, or None where it fails to compile or run."""
    times = []
    for backward in (False, True):
        fn = functools.partial(method, backward=backward, **kwargs)
        try:
            times.append(time_chained(fn, sets, args.iters, args.repeats, shared=meta))
        except Exception as e:  # a configuration Triton cannot compile, or out of memory
            print(f"  {method.__name__} {kwargs} failed: {type(e).__name__}: {str(e)[:300]}")
            times.append(None)
    return times


def table(args):
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    print(f"Hq={heads} Hkv={kv_heads} D={head_dim} bf16, window={args.window}")
    print("| T | layout | method | fwd µs | fwd TFLOP/s | fwd+bwd µs | bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for num_rows in args.tokens:
        sets = make_sets(num_rows, heads, kv_heads, head_dim, jnp.bfloat16)
        for num_segments in args.segments:
            meta = layout(num_rows, num_segments)
            flops = useful_flops(num_rows, num_segments, heads, head_dim, args.window)
            methods = [("ours", ours)]
            if num_rows <= 4096:
                methods.append(("xla", xla))
            if num_segments == 1 and args.window is None:
                methods.append(("jax mha", jax_mha))
            for name, method in methods:
                fwd, total = measure(method, sets, meta, args, sliding_window=args.window)
                bwd = None if fwd is None or total is None else total - fwd
                cells = [
                    num_rows,
                    "dense" if num_segments == 1 else f"packed {num_segments}",
                    name,
                    _fmt(fwd),
                    _fmt(None if fwd is None else flops / fwd / 1e6),
                    _fmt(total),
                    _fmt(None if bwd is None else 2.5 * flops / bwd / 1e6),
                ]
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def sweep(args):
    num_rows, num_segments = args.tokens[-1], args.segments[-1]
    sets = make_sets(num_rows, args.heads, args.kv_heads, args.head_dim, jnp.bfloat16)
    meta = layout(num_rows, num_segments)
    flops = useful_flops(num_rows, num_segments, args.heads, args.head_dim, args.window)
    print(f"T={num_rows}, {num_segments} segments, window={args.window}")

    def run(label, backward, **kwargs):
        fn = functools.partial(ours, backward=backward, sliding_window=args.window, **kwargs)
        try:
            t = time_chained(fn, sets, args.iters, args.repeats, shared=meta)
            work = flops * (3.5 if backward else 1)
            print(f"{label:60s} {t:9.1f} us {work / t / 1e6:6.1f} TFLOP/s", flush=True)
        except Exception as e:
            print(f"{label:60s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)

    run("fwd defaults", False)
    run("fwd+bwd defaults", True)
    for bq, bk, nw, ns in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        run(f"fwd block_q={bq} block_k={bk} warps={nw} stages={ns}", False,
            block_q=bq, block_k=bk, num_warps=nw, num_stages=ns)  # fmt: skip
    # The backward's two kernels share num_warps_bwd/num_stages_bwd; the forward stays at
    # its defaults, so differences are the backward's. First the dk/dv kernel's blocks and
    # head splits (dq at its defaults), then the dq kernel's (dk/dv at its defaults).
    for (bq, bk), splits, nw in itertools.product(
        ((32, 64), (64, 64), (32, 128), (64, 128), (128, 128)), (1, 2, 4), (4, 8)
    ):
        run(f"fwd+bwd dkv={bq}x{bk} splits={splits} warps={nw}", True,
            block_q_dkv=bq, block_k_dkv=bk, dkv_head_splits=splits, num_warps_bwd=nw)  # fmt: skip
    for (bq, bk), nw, ns in itertools.product(
        ((64, 64), (128, 64), (64, 128), (128, 128)), (4, 8), (2, 3)
    ):
        run(f"fwd+bwd dq={bq}x{bk} warps={nw} stages={ns}", True,
            block_q_dq=bq, block_k_dq=bk, num_warps_bwd=nw, num_stages_bwd=ns)  # fmt: skip


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if args.smoke:  # checks the script itself off-GPU: the kernels run interpreted
        args.tokens, args.segments, args.heads, args.kv_heads = [64], [1, 4], 4, 1
        args.head_dim, args.iters, args.repeats = 16, 2, 1
        bench_smlm.L2_FLUSH_BYTES = 0  # two input sets: each is a copy of the kernels
        table(args)
    if args.table:
        table(args)
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()
