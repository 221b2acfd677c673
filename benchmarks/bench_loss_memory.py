"""Temporaries (and, on a GPU, time) of the training head's loss gradient, the logits
made all at once against a chunk of rows at a time (``loqjax.loss.head_token_losses``).

  PYTHONPATH=. python benchmarks/bench_loss_memory.py --out benchmarks/results/loss_memory.jsonl

At the Llama-3-8B shape (bf16, hidden 4096, vocab 128256) for the training rows of one and
four adapters (2 and 8 sequences of 1024 tokens): ``jax.grad`` of the summed token losses
with respect to the final hidden rows, compiled from shapes alone, so a CPU reports XLA's
temporaries without allocating them. ``--time`` also runs each on random inputs (a GPU's
job: seconds a call, median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from loqjax.layers import output_logits
from loqjax.loss import head_token_losses, token_cross_entropy

from bench_common import Rows

HIDDEN, VOCAB = 4096, 128256
LOSSES = {
    "unchunked": lambda x, table, targets: token_cross_entropy(output_logits(x, table), targets),
    "chunked": head_token_losses,
}


def loss_grad(losses):
    return jax.jit(jax.grad(lambda x, table, targets: jnp.sum(losses(x, table, targets))))


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--time", action="store_true", help="also run them (on a GPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    rows = Rows("loss_memory", args.out)
    table = jax.ShapeDtypeStruct((VOCAB, HIDDEN), jnp.bfloat16)
    for num_rows in args.rows:
        x = jax.ShapeDtypeStruct((num_rows, HIDDEN), jnp.bfloat16)
        targets = jax.ShapeDtypeStruct((num_rows,), jnp.int32)
        for name, losses in LOSSES.items():
            compiled = loss_grad(losses).lower(x, table, targets).compile()
            row = dict(
                variant=name,
                rows=num_rows,
                temp_gib=compiled.memory_analysis().temp_size_in_bytes / 2**30,
            )
            if args.time:
                keys = jax.random.split(jax.random.key(num_rows), 3)
                inputs = (
                    jax.random.normal(keys[0], x.shape, x.dtype),
                    (jax.random.normal(keys[1], table.shape) * HIDDEN**-0.5).astype(table.dtype),
                    jax.random.randint(keys[2], targets.shape, 0, VOCAB),
                )
                row["seconds"] = median_seconds(compiled, inputs, args.repeats)
            rows.add(**row)
    rows.table(["variant", "rows", "temp_gib", "seconds"])


if __name__ == "__main__":
    main()
