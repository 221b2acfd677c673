"""Host and device time of the per-slot optimizer's update alone, its state one array per
table of every layer (its layout before 708e89f) or stacked across the layers.

  PYTHONPATH=. python benchmarks/bench_optimizer_dispatch.py --out results.jsonl

A unified step's jitted call spends ~36 ms of host time launching and re-recording one
CUDA graph of 6,219 commands (RESULTS.md, runs 44-47), and the layers under a scan do not
make that launch cheaper (run 48). This script asks how much of it is the optimizer: the
8B shape's tables (32 layers x 7 projections x A and B: 448 leaves of [N, d_in, R] and
[N, R, d_out]) through ``SlotOptimizer.update`` (AdamW, float32 master copies of bf16
tables), keyed "layer.projection.a" (string keys, so the optimizer keeps one state array
per leaf, five a table: its only layout before 708e89f), against the same numbers held as
14 leaves [N, L, ...].

Reported per layout: the leaves in and out of the call, the mean time for the donated
call to return (``dispatch_ms``) and with its result waited for (``step_ms``), and from one
profiled call the host's ``cuGraphLaunch`` and ``command_buffer::update`` self times.
"""

from __future__ import annotations

import argparse
import collections
import time

import jax
import jax.numpy as jnp

from loqjax.optim import SlotOptimizer, adamw

from bench_common import LLAMA3_8B, TINY, Rows, host_profile


def table_shapes(config, num_slots: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Each projection's A [N, d_in, R] and B [N, R, d_out] shapes, by "module.a"/"module.b"."""
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_kv_heads * config.head_dim
    q = config.num_heads * config.head_dim
    dims = {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    shapes = {}
    for name, (d_in, d_out) in dims.items():
        shapes[f"{name}.a"] = (num_slots, d_in, rank)
        shapes[f"{name}.b"] = (num_slots, rank, d_out)
    return shapes


def tables(shapes, num_layers: int, stacked: bool, dtype) -> dict:
    """Tables of ``shapes``: per layer ({"layer.module.x": [N, ...]}) or stacked
    ({"module.x": [N, L, ...]}), small nonzero values."""
    if stacked:
        return {k: jnp.full((s[0], num_layers, *s[1:]), 0.01, dtype) for k, s in shapes.items()}
    return {
        f"{i}.{k}": jnp.full(s, 0.01, dtype) for i in range(num_layers) for k, s in shapes.items()
    }


def measure(optimizer: SlotOptimizer, params: dict, num_slots: int, calls: int) -> dict:
    """Times ``optimizer.update`` of ``params`` (slot 0 trained and applied, the state and
    params donated), ``calls`` calls each on an idle device, then profiles one more."""
    losses = jnp.ones((num_slots,), jnp.float32)
    num_tokens = jnp.full((num_slots,), 1024, jnp.int32)
    apply = jnp.arange(num_slots) == 0
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
    update = jax.jit(
        lambda p, s, g: optimizer.update(p, s, g, losses, num_tokens, apply)[:2],
        donate_argnums=(0, 1),
    )
    carry = list(jax.block_until_ready(update(params, optimizer.init(params), grads)))
    dispatch = step = 0.0
    for _ in range(calls):
        began = time.perf_counter()
        carry[:] = update(*carry, grads)
        dispatch += time.perf_counter() - began
        jax.block_until_ready(carry)
        step += time.perf_counter() - began

    def one_call():
        carry[:] = update(*carry, grads)
        return carry

    events = collections.Counter()
    for r in host_profile(one_call, top=None):
        events[r["event"]] += r["self_ms"]
    return dict(
        leaves_in=len(jax.tree.leaves((carry, grads))),
        dispatch_ms=dispatch / calls * 1e3,
        step_ms=step / calls * 1e3,
        graph_launch_ms=sum(v for k, v in events.items() if k.startswith("cuGraphLaunch")),
        update_ms=events.get("command_buffer::update", 0.0),
        state_gib=sum(x.nbytes for x in jax.tree.leaves(carry)) / 2**30,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    config = TINY if args.tiny else LLAMA3_8B
    rows = Rows("optimizer_dispatch", args.out)
    optimizer = SlotOptimizer(adamw(2e-5))
    shapes = table_shapes(config, args.slots, args.rank)
    for layout in ("per_layer", "stacked"):
        params = tables(shapes, config.num_layers, layout == "stacked", jnp.bfloat16)
        rows.add(layout=layout, **measure(optimizer, params, args.slots, args.calls))
    rows.table(["layout", "leaves_in", "dispatch_ms", "step_ms", "graph_launch_ms", "update_ms"])


if __name__ == "__main__":
    main()
