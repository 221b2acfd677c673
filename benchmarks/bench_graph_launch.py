"""Host time of a jitted step against its number of kernels: layers unrolled or under a scan.

  PYTHONPATH=. python benchmarks/bench_graph_launch.py --out benchmarks/results/graph_launch.jsonl

The unified step's jitted call spends ~36 ms of host time launching and re-recording one
CUDA graph of 6,219 commands (RESULTS.md, runs 44-47). This script asks what that cost
grows with, on a stand-in whose device work is small: ``--layers`` small layers (two
matmuls, a GELU, a residual and an RMS norm: a few kernels each) over stacked weights,
either unrolled (every layer its own kernels, as the model's 32 layers are) or under
``jax.lax.scan`` (one loop whose body XLA records once). Each step gets either the same
input array every call or a new one (whose buffer moves, as a batch's does).

Reported per variant: the mean time for the call to return (``dispatch_ms``), the mean
time of a call that also waits for its result (``step_ms``), and from one profiled call the
host's ``cuGraphLaunch`` and ``command_buffer::update`` self times (GPU only).
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import jax.numpy as jnp

from bench_common import Rows, host_profile


def layer(x: jax.Array, w_in: jax.Array, w_out: jax.Array) -> jax.Array:
    """x [T, d] -> [T, d]: a residual MLP block, w_in [d, f], w_out [f, d]."""
    h = jax.nn.gelu(x @ w_in) @ w_out
    y = x + h
    return y * jax.lax.rsqrt(
        jnp.mean(jnp.square(y.astype(jnp.float32)), -1, keepdims=True) + 1e-6
    ).astype(y.dtype)


def unrolled(x, w_in, w_out):
    for i in range(w_in.shape[0]):
        x = layer(x, w_in[i], w_out[i])
    return x


def scanned(x, w_in, w_out):
    return jax.lax.scan(lambda x, w: (layer(x, *w), None), x, (w_in, w_out))[0]


def timed(fn, inputs, calls: int) -> tuple[float, float]:
    """(mean seconds for a call to return, mean seconds with its result waited for), each
    call starting on an idle device."""
    dispatch = step = 0.0
    for i in range(calls):
        x = inputs(i)
        jax.block_until_ready(x)
        began = time.perf_counter()
        y = fn(x)
        dispatch += time.perf_counter() - began
        jax.block_until_ready(y)
        step += time.perf_counter() - began
    return dispatch / calls, step / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    rows = Rows("graph_launch", args.out)
    key = jax.random.key(0)
    d, f = args.width, 2 * args.width
    same = jax.random.normal(key, (args.rows, d), jnp.bfloat16)
    fresh = [same + i for i in range(args.calls + 1)]  # made before timing: buffers that move
    for layers in args.layers:
        w_in = jax.random.normal(key, (layers, d, f), jnp.bfloat16) / d**0.5
        w_out = jax.random.normal(key, (layers, f, d), jnp.bfloat16) / f**0.5
        for form, body in (("unrolled", unrolled), ("scan", scanned)):
            # The weights are arguments: closed over, they would be constants in the program.
            jitted = jax.jit(body)

            def fn(x, jitted=jitted, w_in=w_in, w_out=w_out):
                return jitted(x, w_in, w_out)

            jax.block_until_ready(fn(same))  # compiles, records the graphs
            jax.block_until_ready(fn(fresh[-1]))
            for inputs, pick in (("same", lambda i: same), ("new", lambda i: fresh[i])):
                dispatch_s, step_s = timed(fn, pick, args.calls)
                events = collections.Counter()
                for r in host_profile(lambda fn=fn, pick=pick: fn(pick(0)), top=None):
                    events[r["event"]] += r["self_ms"]
                rows.add(
                    form=form,
                    layers=layers,
                    inputs=inputs,
                    dispatch_ms=dispatch_s * 1e3,
                    step_ms=step_s * 1e3,
                    graph_launch_ms=sum(
                        v for k, v in events.items() if k.startswith("cuGraphLaunch")
                    ),
                    update_ms=events.get("command_buffer::update", 0.0),
                )
    rows.table(
        ["form", "layers", "inputs", "dispatch_ms", "step_ms", "graph_launch_ms", "update_ms"]
    )


if __name__ == "__main__":
    main()
