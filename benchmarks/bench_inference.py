"""Serving throughput of the Engine with many adapters in the batch, against the same
engine on the base model without LoRA tables.

  PYTHONPATH=. python benchmarks/bench_inference.py --out benchmarks/results/inference.jsonl
  PYTHONPATH=. python benchmarks/bench_inference.py --tiny   # every path, on a CPU

Model: the Llama-3-8B shape with random bf16 weights (``bench_common``). For each batch size
B of ``--batches``, B requests of ``--prompt-len`` random ids, each generating exactly
``--new-tokens`` tokens (greedy, EOS ignored), are submitted at once and the engine steps
until all finish: continuous batching with chunked prefill (``--prefill-capacity`` tokens a
step), then decode steps (token buckets: ``--decode-bucket`` rows, default the largest B,
and the prefill capacity). Variants:
``base`` (a model without adapter tables: the no-LoRA floor) and ``lora<n>``: the model
with 64-slot, rank-8 tables, request i served by adapter i % n (r=8, alpha=16, all seven
projections).

Reported per (variant, B), from one timed run after a warm-up run that compiles:
prefill tokens/s = B * prompt_len / (time until every request has its first token);
decode tokens/s = B * (new_tokens - 1) / (the rest of the time); output tokens/s = B *
new_tokens / total time (what ``bench_peft.py`` reports for HF ``generate``); the step
times (median decode step), the decode's memory floor (weights read once per step at the
copy bandwidth measured in the same run) and the ratio of each LoRA variant's decode to
``base``'s. Everything is host-inclusive: scheduling, packing and the per-step sync.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import sys
import time

import numpy as np

from loqjax import AdapterRegistry, Engine, EngineConfig, SamplingParams, add_lora_tables

from bench_common import (
    Rows,
    Timer,
    load_adapters,
    measure_ceilings,
    model_config,
    num_matmul_params,
    peak_memory_gib,
    random_model,
)

MAX_SLOTS = 64


def generate(engine: Engine, batch: int, adapters, prompt_len: int, new_tokens: int, seed: int):
    """Submits ``batch`` requests and steps until they finish. Returns (seconds to the last
    first token, total seconds, per-step seconds after prefill)."""
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    handles = [
        engine.submit(
            rng.integers(0, vocab, prompt_len).tolist(),
            None if not adapters else adapters[i % len(adapters)],
            params,
        )
        for i in range(batch)
    ]
    start = engine.clock()
    prefilled, step_times = None, []
    while engine.num_unfinished:
        before = engine.clock()
        engine.step()
        now = engine.clock()
        if prefilled is None and all(h.output().token_ids for h in handles):
            prefilled = now - start
        elif prefilled is not None:
            step_times.append(now - before)
    total = engine.clock() - start
    assert all(len(h.result().token_ids) == new_tokens for h in handles)
    return prefilled, total, step_times


class GcPauses:
    """Milliseconds of every full (generation 2) garbage collection while active."""

    def __init__(self):
        self.ms: list[float] = []
        self._start = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase, info):
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.ms.append(1e3 * (time.perf_counter() - self._start))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized run")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prefill-capacity", type=int, default=2048)
    parser.add_argument(
        "--decode-bucket",
        type=int,
        default=None,
        help="decode steps' rows (default the largest batch: smaller batches decode at it, "
        "a memory-bound step costing about the same, and compile once less)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once the model is built: full collections skip its objects",
    )
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    parser.add_argument(
        "--stacks-every", type=float, default=0, help="print Python stacks every N s (0: off)"
    )
    args = parser.parse_args(argv)
    if args.stacks_every:
        faulthandler.dump_traceback_later(args.stacks_every, repeat=True, file=sys.stderr)
    prompt_len = args.prompt_len or (8 if args.tiny else 128)
    new_tokens = args.new_tokens or (4 if args.tiny else 128)
    config = model_config(args.tiny)
    rows = Rows("inference", args.out)
    ceilings = measure_ceilings(args.tiny)
    rows.add(variant="ceilings", **ceilings)

    max_batch = max(args.batches)
    page_size = 16
    seq_len = prompt_len + new_tokens
    engine_config = EngineConfig(
        token_capacity=max(args.prefill_capacity, max_batch),
        max_seqs=max_batch,
        page_size=page_size,
        num_pages=max_batch * -(-seq_len // page_size) + 1,
        max_seq_len=seq_len,
        token_buckets=(args.decode_bucket or max_batch,),
    )
    model = random_model(config)
    pauses = GcPauses()
    # A decode step reads every matmul weight once (bf16), whatever the batch.
    floor_s = 2 * num_matmul_params(config) / (ceilings["copy_tb_per_s"] * 1e12)

    base_decode = {}
    engine, names = Engine(model, config=engine_config), []
    for n in [0, *args.adapters]:
        if n and not names:  # the base is done: give the same model its tables
            add_lora_tables(model, num_slots=MAX_SLOTS, max_rank=8)
            registry = AdapterRegistry(model)
            with Timer() as load:
                names = load_adapters(registry, model, MAX_SLOTS)
            rows.add(variant="load_adapters", n_adapters=MAX_SLOTS, seconds=load.seconds)
            engine = Engine(model, registry, config=engine_config)
        name, adapters = (f"lora{n}", names[:n]) if n else ("base", [])
        for batch in args.batches:
            if n > batch:
                continue
            print(f"{name} B={batch}", file=sys.stderr, flush=True)
            with Timer() as warm:  # compiles the prefill and decode buckets
                generate(engine, batch, adapters, prompt_len, 2, seed=1)
            if args.gc_freeze:
                gc.freeze()
            pauses.ms.clear()
            prefill_s, total_s, steps = generate(
                engine, batch, adapters, prompt_len, new_tokens, seed=2
            )
            decode_s = total_s - prefill_s
            decode_tps = batch * (new_tokens - 1) / decode_s
            if not n:
                base_decode[batch] = decode_tps
            rows.add(
                variant=name,
                batch=batch,
                n_adapters=n,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                warmup_s=warm.seconds,
                prefill_s=prefill_s,
                seconds=total_s,
                prefill_tokens_per_s=batch * prompt_len / prefill_s,
                decode_tokens_per_s=decode_tps,
                tokens_per_s=batch * new_tokens / total_s,
                median_step_ms=1e3 * float(np.median(steps)) if steps else None,
                # Where a decode's time beyond its median steps goes: one slow step or many.
                max_step_ms=1e3 * max(steps) if steps else None,
                steps_over_2x_median=int(sum(t > 2 * np.median(steps) for t in steps)),
                full_gc_ms=list(pauses.ms),
                gc_freeze=args.gc_freeze,
                floor_step_ms=1e3 * floor_s,
                vs_base_decode=decode_tps / base_decode[batch] if n else 1.0,
                peak_mem_gib=peak_memory_gib(),
            )
    rows.table(
        [
            "variant",
            "batch",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "tokens_per_s",
            "median_step_ms",
            "floor_step_ms",
            "vs_base_decode",
        ]
    )


if __name__ == "__main__":
    main()
