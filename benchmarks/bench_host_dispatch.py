"""Host time to dispatch a step with the training state's arrays, against one flat buffer.

  PYTHONPATH=. python benchmarks/bench_host_dispatch.py --out benchmarks/results/host_dispatch.jsonl

The unified step takes the frozen base and the ``TrainState`` as lists of arrays and
returns the state, donated, as a new list (``loqjax.leaves``). For the Llama-3-8B structure
(32 layers, 8-slot tables on all seven projections) that is 515 frozen arrays in and 2249
state arrays in and out, and each costs the host time to dispatch the call. This script
builds those exact leaves (tiny dimensions: the counts, dtypes and ranks are what matter)
and times, per call until it returns (the work itself is one addition per array):

* ``leaves``: the frozen leaves in, the state leaves donated in and returned, as the
  unified step does;
* ``leaves_in``: the same arrays in, one scalar out (what the outputs cost is the
  difference);
* ``leaves_kept``: as ``leaves``, but nothing donated (what donating costs is the
  difference);
* ``flat``: the state as one flat buffer per dtype, donated in and out, the frozen leaves in.

The device's own work is not timed: it runs after the call returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from loqjax import AdapterRegistry, LoraConfig, add_lora_tables
from loqjax.optim import SlotOptimizer, adamw
from loqjax.unified import TrainState, split_model

from bench_common import TINY, Rows, random_model

NUM_SLOTS = 8


def state_leaves(num_layers: int) -> tuple[list[jax.Array], list[jax.Array]]:
    """(frozen leaves, TrainState leaves) of a tiny model of ``num_layers`` layers with
    ``NUM_SLOTS``-slot rank-8 tables on all seven projections, one adapter loaded."""
    model = random_model(dataclasses.replace(TINY, num_layers=num_layers))
    add_lora_tables(model, num_slots=NUM_SLOTS, max_rank=8)
    AdapterRegistry(model).load("job", LoraConfig(rank=8, alpha=16.0).init_adapter(model))
    _, frozen, params = split_model(model)
    state = TrainState.create(params, SlotOptimizer(adamw(2e-5)))
    return jax.tree.leaves(frozen), jax.tree.leaves(state)


def dispatch_ms(step, frozen, state, donated: bool, calls: int) -> float:
    """Median ms a call of ``step(frozen, state)`` takes to return, the device idle before
    each; a donated state is replaced by what the call returns."""
    times = []
    for _ in range(calls):
        jax.block_until_ready(state)
        start = time.perf_counter()
        out = step(frozen, state)
        times.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        if donated:
            state = out
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    rows = Rows("host_dispatch", args.out)
    frozen, state = state_leaves(args.layers)
    one = jnp.ones((), jnp.float32)

    def bump(x):
        return x + one.astype(x.dtype)

    leaves = jax.jit(lambda fr, st: [bump(x) for x in st], donate_argnums=1)
    leaves_in = jax.jit(lambda fr, st: sum(x.ravel()[0].astype(jnp.float32) for x in st))
    leaves_kept = jax.jit(lambda fr, st: [bump(x) for x in st])
    dtypes = sorted({x.dtype for x in state}, key=str)
    flat_state = [jnp.concatenate([x.ravel() for x in state if x.dtype == d]) for d in dtypes]
    flat = jax.jit(lambda fr, st: [bump(x) for x in st], donate_argnums=1)
    assert sum(x.nbytes for x in flat_state) == sum(x.nbytes for x in state)

    variants = [
        ("leaves", leaves, [jnp.copy(x) for x in state], True),
        ("leaves_in", leaves_in, state, False),
        ("leaves_kept", leaves_kept, state, False),
        ("flat", flat, flat_state, True),
    ]
    for name, step, arrays, donated in variants:
        arrays = step(frozen, arrays) if donated else arrays  # compiles
        rows.add(
            variant=name,
            frozen_arrays=len(frozen),
            state_arrays=len(arrays),
            dispatch_ms=dispatch_ms(step, frozen, arrays, donated, args.calls),
        )
    rows.table(["variant", "frozen_arrays", "state_arrays", "dispatch_ms"])


if __name__ == "__main__":
    main()
