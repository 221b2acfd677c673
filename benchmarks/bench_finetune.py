"""Fine-tuning throughput and peak memory of the unified step, one and several adapters
trained at once.

  PYTHONPATH=. python benchmarks/bench_finetune.py --out benchmarks/results/finetune.jsonl
  PYTHONPATH=. python benchmarks/bench_finetune.py --tiny   # every path, on a CPU

Model: the Llama-3-8B shape with random bf16 weights and 8-slot rank-8 adapter tables on all
seven projections (``bench_common``). For each count n of ``--adapters``, n fresh adapters
(PEFT's init: A random, B = 0) each take ``--seqs`` sequences of ``--seq-len`` random ids an
update (Loquetier's setting: 2 x 1024), all in one unified step with no serving rows (train
rows n * seqs * seq_len); AdamW (lr 2e-5, the per-slot optimizer), every step applied. With
``--step-seqs`` S, a step carries S of those sequences instead, round-robin over the
adapters, and a slot applies its update at the step with its last one: the n adapters
train concurrently, their updates accumulated over n * seqs / S steps of S * seq_len rows.
``--backward`` picks the unified step's strategy (``save``, ``recompute`` or both; with
``recompute``, each count of ``--saved-layers`` in turn: the last layers that keep their
activations), and ``--schedules`` its command-buffer schedule (``SCHEDULES``), each
combination compiled afresh.

Reported: tokens/s over ``--steps`` timed steps after ``--warmup`` (the first compiles),
for each ``--sync`` (``timed_steps``): reading the losses each step (``each``, as a training
loop logging them does) or one step late (``lagged``, so the host queues a step while the
device runs the one before), with the mean time the jitted call takes to return
(``dispatch_s``) and adapter 0's loss in the last timed step (``loss``: the same seeds give
the same losses, so two runs under different XLA flags can be compared); the model FLOP
rate, counting 4 * (matmul params) FLOPs a token (forward and input gradient: the base
is frozen, so no weight gradient) plus causal attention (3 * 2 * seq_len * d_model per token
per layer, forward and backward), against the bf16 matmul rate measured in the same run;
and the device's peak memory so far (jax's ``peak_bytes_in_use``; the runs go in ascending
memory order, so each row's peak is its own: give ``--schedules lhs concurrent``,
``--backward recompute save`` and ``--saved-layers`` ascending), and the compiled step's
temporaries.

For the host's side of a step: ``--profile`` adds the kernel times of one more step,
``--host-profile`` its host-side trace events by self time (``bench_common.host_profile``);
``--same-batch`` times every step on one device-resident batch and ``--reuse-outputs`` puts
each step's outputs in the last step's donated buffers, so that neither moves between calls
(what XLA's command buffers re-record for: RESULTS.md, runs 44-47).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from loqjax import AdapterRegistry, LoraConfig, add_lora_tables
from loqjax.leaves import Leaves
from loqjax.optim import SlotOptimizer, adamw
from loqjax.serve_step import SERVING_COMPILER_OPTIONS
from loqjax.unified import TrainState, make_unified_step, split_model

from bench_common import (
    Rows,
    Timer,
    host_profile,
    kernel_profile,
    measure_ceilings,
    model_config,
    num_matmul_params,
    peak_memory_gib,
    random_model,
    random_training_batch,
)

NUM_SLOTS = 8
UNIFIED = importlib.import_module("loqjax.unified")
# The unified step's command-buffer schedule: XLA's default (LHS) or the serving step's.
SCHEDULES = {"lhs": {}, "concurrent": dict(SERVING_COMPILER_OPTIONS)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized run")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seqs", type=int, default=2, help="sequences per adapter and step")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument(
        "--step-seqs",
        type=int,
        default=None,
        help="sequences a step (default all: every adapter's update in one step); fewer "
        "spread the updates over steps that accumulate (random_training_batch)",
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backward", nargs="+", default=["save"], choices=["save", "recompute"])
    parser.add_argument(
        "--saved-layers", type=int, nargs="+", default=[0], help="with --backward recompute"
    )
    parser.add_argument("--schedules", nargs="+", default=["lhs"], choices=list(SCHEDULES))
    parser.add_argument("--sync", nargs="+", default=["each"], choices=["each", "lagged"])
    parser.add_argument(
        "--same-batch",
        action="store_true",
        help="time every step on one device-resident batch (whose buffers do not move)",
    )
    parser.add_argument(
        "--reuse-outputs",
        action="store_true",
        help="each step's outputs in the last step's (donated) buffers, so that they do not "
        "move between calls (--sync each only)",
    )
    parser.add_argument("--profile", action="store_true", help="kernel times of one step")
    parser.add_argument(
        "--host-profile", action="store_true", help="the host's time in one step, by trace event"
    )
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    args = parser.parse_args(argv)
    if args.reuse_outputs and args.sync != ["each"]:
        parser.error("--reuse-outputs donates each step's outputs to the next: --sync each only")
    seq_len = args.seq_len or (16 if args.tiny else 1024)
    steps = args.steps or (2 if args.tiny else 10)
    config = model_config(args.tiny)
    rows = Rows("finetune", args.out)
    ceilings = measure_ceilings(args.tiny)
    rows.add(variant="ceilings", **ceilings)

    model = random_model(config)
    add_lora_tables(model, num_slots=NUM_SLOTS, max_rank=8)
    registry = AdapterRegistry(model)
    for i in range(max(args.adapters)):
        registry.load(f"job{i}", LoraConfig(rank=8, alpha=16.0, seed=i).init_adapter(model))
    optimizer = SlotOptimizer(adamw(2e-5))
    graphdef, frozen, params = split_model(model)
    # As the runtime does: the step takes and returns leaves (loqjax.leaves).
    frozen, state = Leaves.of(frozen), Leaves.of(TrainState.create(params, optimizer))
    leaves_of = (frozen.treedef, state.treedef)
    frozen, state = frozen.leaves, state.leaves
    rng = np.random.default_rng(0)
    flops_per_token = 4 * num_matmul_params(config) + (
        3 * 2 * seq_len * config.hidden_size * config.num_layers
    )

    strategies = [
        (backward, saved)
        for backward in args.backward
        for saved in (args.saved_layers if backward == "recompute" else [0])
    ]
    for (backward, saved_layers), schedule in itertools.product(strategies, args.schedules):
        UNIFIED.UNIFIED_COMPILER_OPTIONS = SCHEDULES[schedule]
        step = make_unified_step(
            graphdef, optimizer, backward=backward, saved_layers=saved_layers, leaves_of=leaves_of
        )
        timed_step = outputs_in_place(step) if args.reuse_outputs else step
        for n in sorted(args.adapters):
            step_seqs = args.step_seqs or n * args.seqs
            num_rows = step_seqs * seq_len
            steps_drawn = itertools.count()

            def batch(n=n, step_seqs=step_seqs, steps_drawn=steps_drawn):
                return random_training_batch(
                    rng,
                    config.vocab_size,
                    n,
                    args.seqs,
                    seq_len,
                    NUM_SLOTS,
                    step_seqs=step_seqs,
                    step=next(steps_drawn),
                )

            with Timer() as warm:
                for _ in range(args.warmup):
                    state, _, out = timed_step(frozen, state, batch(), None)
                    float(out.loss[0])
            timings, dispatch_s, losses_of = {}, {}, {}
            for sync in args.sync:
                if args.same_batch:
                    batches = [jax.device_put(batch())] * steps
                else:
                    batches = [batch() for _ in range(steps)]
                print(f"# {n} adapter(s), sync {sync}: {steps} timed steps", flush=True)
                with Timer() as timings[sync]:
                    state, out, losses, dispatch_s[sync] = timed_steps(
                        timed_step, frozen, state, batches, sync
                    )
                losses_of[sync] = float(losses[0])
                updated, trained = np.asarray(out.updated), np.asarray(out.num_tokens) > 0
                every_slot = step_seqs == n * args.seqs  # else some steps only accumulate
                assert np.isfinite(losses[trained]).all(), losses
                assert updated[:n].all() or not every_slot, updated
            profilers = [
                (f"profile {n}", kernel_profile) if args.profile else None,
                (f"host {n}", host_profile) if args.host_profile else None,
            ]
            for variant, profile in filter(None, profilers):
                # A batch drawn only when profiling: rng draws stay as without a profile.
                profiled = batches[0] if args.same_batch else batch()

                def one_step(profiled=profiled, step=timed_step):
                    nonlocal state
                    state, _, out = step(frozen, state, profiled, None)
                    return out.loss

                for row in profile(one_step):
                    rows.add(
                        variant=variant,
                        backward=backward,
                        saved_layers=saved_layers,
                        schedule=schedule,
                        **row,
                    )
            # The persistent compilation cache makes this compile a lookup on a GPU run;
            # with --reuse-outputs, the step alone was never compiled: not measured.
            temp_gib = None
            if not args.reuse_outputs:
                compiled = step.lower(frozen, state, batch(), None).compile()
                temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
            for sync, timed in timings.items():
                tokens_per_s = num_rows * steps / timed.seconds
                tflops = flops_per_token * tokens_per_s / 1e12
                rows.add(
                    variant=f"{n} adapter{'s' * (n > 1)}",
                    backward=backward,
                    saved_layers=saved_layers,
                    schedule=schedule,
                    sync=sync,
                    same_batch=args.same_batch,
                    reuse_outputs=args.reuse_outputs,
                    n_adapters=n,
                    step_seqs=step_seqs,
                    rows=num_rows,
                    seq_len=seq_len,
                    warmup_s=warm.seconds,
                    step_s=timed.seconds / steps,
                    dispatch_s=dispatch_s[sync],
                    loss=losses_of[sync],
                    tokens_per_s=tokens_per_s,
                    model_tflops=tflops,
                    vs_matmul_peak=tflops / ceilings["matmul_tflops"],
                    peak_mem_gib=peak_memory_gib(),
                    temp_gib=temp_gib,
                )
    rows.table(
        [
            "variant",
            "backward",
            "saved_layers",
            "schedule",
            "sync",
            "rows",
            "step_s",
            "tokens_per_s",
            "model_tflops",
            "vs_matmul_peak",
            "peak_mem_gib",
            "temp_gib",
        ]
    )


def outputs_in_place(step):
    """``step`` whose outputs (``StepOutput``) take the buffers of the last call's, donated
    (zeros before the first call): XLA updates a command buffer for every buffer that
    moved since its last call, and a jitted call's outputs are new buffers unless they
    alias donated inputs. The last output is deleted by the next call."""
    previous = None

    def into(frozen, state, batch, cache, previous):
        del previous  # donated: its buffers hold this step's outputs
        return step(frozen, state, batch, cache)

    jitted = jax.jit(into, donate_argnums=(1, 4))

    def call(frozen, state, batch, cache):
        nonlocal previous
        if previous is None:
            shapes = jax.eval_shape(step, frozen, state, batch, cache)[2]
            previous = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        state, cache, previous = jitted(frozen, state, batch, cache, previous)
        return state, cache, previous

    return call


def timed_steps(step, frozen, state, batches, sync):
    """Runs ``step`` on every batch; returns (state, the last step's output, its loss on
    the host, the mean time the jitted call took to return). ``each`` reads every step's
    losses before the next step (as a loop logging them does), so the host's dispatch of a
    step never overlaps the device's work; ``lagged`` reads step i's after queueing step
    i + 1 (a loop logging a step late)."""
    previous, dispatch = None, 0.0
    for b in batches:
        began = time.perf_counter()
        state, _, out = step(frozen, state, b, None)
        dispatch += time.perf_counter() - began
        if sync == "each":
            np.asarray(out.loss)
        elif previous is not None:
            np.asarray(previous.loss)
        previous = out
    return state, out, np.asarray(out.loss), dispatch / len(batches)


if __name__ == "__main__":
    main()
