"""Unified serving and fine-tuning: Poisson serving load on 4 adapters while 2 adapters
fine-tune, in one Runtime on one GPU.

  PYTHONPATH=. python benchmarks/bench_unified.py --out benchmarks/results/unified.jsonl
  PYTHONPATH=. python benchmarks/bench_unified.py --tiny   # every path, on a CPU

Model: the Llama-3-8B shape with random bf16 weights, 8-slot rank-8 tables on all seven
projections (``bench_common``). Serving adapters a0..a3 (random, r=8, alpha=16); two jobs
j0, j1 fine-tune fresh adapters (PEFT's init) on random 1024-token sequences, 2 sequences
(2048 tokens) per AdamW update, Loquetier's setting. The runtime's training steps carry one
1024-token sequence (jobs take turns) next to up to 64 serving tokens; its other steps
serve (prefill chunks of up to 1024 tokens, decode steps of 32 rows). ``--train-seq-len``
makes the sequences, and a training step's rows, shorter (an update keeps its 2048
tokens): a unified step shorter than the TPOT target lets the runtime train at nearly
every step. ``--train-rows 2048`` gives a step both jobs' sequences, the rows of
``bench_finetune``'s step (``--rates`` with no value: fine-tuning alone only).

Load: requests arrive as a Poisson process at each rate of ``--rates`` for ``--duration``
seconds, each for a random one of the 4 adapters, with prompt and output lengths drawn
from fixed log-normal distributions shaped like ShareGPT's (prompt median 180 tokens,
output median 150, clipped to [8, 1024] and [8, 512]; seeded, so every run and rate draws
the same sequence), sampled with Loquetier's settings (temperature 0.9, top-p 0.8,
repetition penalty 1.1), each generating exactly its drawn output length. Requests count
from their scheduled arrival; after the window, the queue drains for at most
``--drain`` seconds, and a request still unfinished then misses the SLO.

Reported per rate: TTFT and TPOT (per-request mean time per output token) p50/p99, SLO
attainment (TTFT <= 2 s and TPOT <= 45 ms) over all arrived requests, served output
tokens/s, and fine-tuning tokens/s over the arrival window against fine-tuning alone (the
same runtime with no requests, measured first). ``--unified-run`` runs every rate once
for each value of ``RuntimeConfig.unified_run`` given (the training steps in a row the
policy waits to fit before it trains under load), on the same arrivals.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import itertools
import pstats
import time
from pathlib import Path

import numpy as np

from loqjax import (
    AdapterRegistry,
    EngineConfig,
    FineTuneJob,
    LoraConfig,
    Runtime,
    RuntimeConfig,
    SamplingParams,
    SloTargets,
    add_lora_tables,
)
from loqjax.metrics import Metrics, percentiles
from loqjax.optim import SlotOptimizer, adamw

from bench_common import (
    Rows,
    load_adapters,
    model_config,
    peak_memory_gib,
    random_model,
    step_phases,
)

SLO = SloTargets(ttft_s=2.0, tpot_s=0.045)
# Loquetier's sampling settings; each request adds its output length.
SAMPLING = SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.1)


@dataclasses.dataclass(frozen=True)
class Shapes:
    seq_len: int  # training sequence
    prompt: tuple[float, int, int]  # log-normal median, min, max
    output: tuple[float, int, int]
    serving: EngineConfig
    unified_serve_rows: int


FULL = Shapes(
    seq_len=1024,
    prompt=(180, 8, 1024),
    output=(150, 8, 512),
    serving=EngineConfig(
        token_capacity=1024,
        max_seqs=32,
        page_size=16,
        num_pages=32 * 96 + 1,
        max_seq_len=1536,
        token_buckets=(32,),
    ),
    unified_serve_rows=64,
)
TINY = Shapes(
    seq_len=32,
    prompt=(12, 4, 24),
    output=(6, 2, 12),
    serving=EngineConfig(
        token_capacity=64,
        max_seqs=8,
        page_size=8,
        num_pages=8 * 5 + 1,
        max_seq_len=40,
        token_buckets=(8,),
    ),
    unified_serve_rows=16,
)


def lengths(rng, shape: tuple[float, int, int], sigma: float) -> int:
    median, low, high = shape
    return int(np.clip(rng.lognormal(np.log(median), sigma), low, high))


def job_dataset(rng, vocab: int, seq_len: int, count: int = 64) -> list[dict]:
    return [{"token_ids": rng.integers(0, vocab, seq_len).tolist()} for _ in range(count)]


def run_load(
    runtime: Runtime, rate: float, duration: float, drain: float, shapes, seed: int, log_path=None
):
    """Serves a Poisson load at ``rate`` for ``duration`` s, then drains; returns the
    phase's metrics (logged to ``log_path`` if given), the arrivals, the requests
    finished and the training tokens in the window."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, int(rate * duration * 3) + 10) if rate else []
    start = runtime.clock()
    arrivals = start + np.cumsum(gaps)
    arrivals = arrivals[arrivals < start + duration]
    vocab = runtime.model_config.vocab_size
    metrics = runtime.metrics = Metrics(SLO, log_path)
    handles, next_arrival = [], 0
    trained_before = _trained(runtime)
    window_trained = None
    while True:
        now = runtime.clock()
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= now:
            prompt = rng.integers(0, vocab, lengths(rng, shapes.prompt, 0.9)).tolist()
            params = dataclasses.replace(
                SAMPLING, max_tokens=lengths(rng, shapes.output, 0.8), ignore_eos=True
            )
            adapter = f"a{int(rng.integers(4))}"
            handles.append(
                runtime.submit(prompt, adapter, params, arrival=float(arrivals[next_arrival]))
            )
            next_arrival += 1
        if window_trained is None and now >= start + duration:
            window_trained = _trained(runtime) - trained_before
        window_over = now >= start + duration
        if window_over and (now >= start + duration + drain or not runtime.num_unfinished):
            break
        runtime.step()
    finished = sum(handle.done for handle in handles)
    for handle in handles:  # what the drain left unfinished misses the SLO
        handle.cancel()
    return metrics, len(arrivals), finished, window_trained


# Runtime.step's parts alone: the unified step's dispatch (the jitted call's return) and
# the landing (reading back the step before, mostly waiting for the device).
HOST_PHASES = {"dispatch": "_step", "land": "_land"}


def profile_host(runtime: Runtime, steps: int, out_dir: str | None) -> None:
    """``steps`` steps under cProfile; the 60 functions of most cumulative time to
    ``out_dir``/alone_profile.txt (or stdout)."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [runtime.step() for _ in range(steps)])
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
    if out_dir is None:
        print(text.getvalue())
        return
    path = Path(out_dir) / "alone_profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


def _trained(runtime: Runtime) -> int:
    return sum(run.trained_tokens for run in runtime.jobs.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized run")
    parser.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    parser.add_argument("--duration", type=float, default=None, help="arrival window (s)")
    parser.add_argument("--drain", type=float, default=None)
    parser.add_argument("--alone", type=float, default=None, help="fine-tuning alone (s)")
    parser.add_argument("--min-train-share", type=float, default=0.3)
    parser.add_argument("--backward", default="save", choices=["save", "recompute"])
    parser.add_argument(
        "--pipeline",
        default="always",
        choices=["no_requests", "always", "never"],
        help="RuntimeConfig.pipeline",
    )
    parser.add_argument(
        "--train-seq-len", type=int, default=None, help="training sequence and step rows"
    )
    parser.add_argument(
        "--train-rows",
        type=int,
        default=None,
        help="training rows a unified step (default one sequence; at most 2 sequences)",
    )
    parser.add_argument(
        "--unified-serve-rows",
        type=int,
        default=None,
        help="RuntimeConfig.unified_serve_rows (default 64; the tiny model's 16)",
    )
    parser.add_argument(
        "--unified-run",
        type=int,
        nargs="+",
        default=[RuntimeConfig.unified_run],
        help="RuntimeConfig.unified_run; each value runs every rate (the same arrivals)",
    )
    parser.add_argument(
        "--profile-alone",
        type=int,
        default=0,
        metavar="STEPS",
        help="after fine-tuning alone, time STEPS more steps' dispatch and landing, then "
        "profile STEPS steps' host code (cProfile; the top functions to --metrics-dir)",
    )
    parser.add_argument("--out", default=None, help="append JSON rows to this file")
    parser.add_argument(
        "--metrics-dir", default=None, help="each rate's step and request log (JSONL) here"
    )
    args = parser.parse_args(argv)
    duration = args.duration or (6.0 if args.tiny else 30.0)
    drain = args.drain or (4.0 if args.tiny else 20.0)
    alone = args.alone or (4.0 if args.tiny else 15.0)
    shapes = TINY if args.tiny else FULL
    batch_tokens = 2 * shapes.seq_len
    if args.train_seq_len:
        shapes = dataclasses.replace(shapes, seq_len=args.train_seq_len)
    # Fewer rows than a sequence: Runtime.add_job rejects the jobs. More than two sequences
    # would only pad, as a step packs at most two (max_train_seqs).
    if args.train_rows is not None and args.train_rows > 2 * shapes.seq_len:
        parser.error(f"--train-rows over two {shapes.seq_len}-token sequences would only pad")
    config = model_config(args.tiny)
    rows = Rows("unified", args.out)

    began = time.perf_counter()
    model = random_model(config)
    add_lora_tables(model, num_slots=8, max_rank=8)
    registry = AdapterRegistry(model)
    load_adapters(registry, model, 4)
    print(f"model and serving adapters ready after {time.perf_counter() - began:.0f} s", flush=True)
    runtime = Runtime(
        model,
        registry,
        None,
        RuntimeConfig(
            serving=shapes.serving,
            train_rows=args.train_rows or shapes.seq_len,
            max_train_seqs=2,
            unified_serve_rows=args.unified_serve_rows or shapes.unified_serve_rows,
            min_train_share=args.min_train_share,
            slo=SLO,
            backward=args.backward,
            pipeline=args.pipeline,
        ),
        optimizer=SlotOptimizer(adamw(2e-5)),
        progress=False,
    )
    print(f"runtime ready after {time.perf_counter() - began:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        runtime.add_job(
            FineTuneJob(
                f"j{i}",
                job_dataset(rng, config.vocab_size, shapes.seq_len),
                LoraConfig(rank=8, alpha=16.0, seed=i),
                steps=10**6,
                batch_tokens=batch_tokens,
                eval_fraction=0.0,
            )
        )
    print(f"model, adapters and jobs ready after {runtime.clock() - began:.0f} s", flush=True)
    start = runtime.clock()
    runtime.warmup(sampling=[SAMPLING])
    rows.add(variant="warmup", seconds=runtime.clock() - start)

    trained_before, start = _trained(runtime), runtime.clock()
    while runtime.clock() < start + alone:
        runtime.step()
    alone_tps = (_trained(runtime) - trained_before) / (runtime.clock() - start)
    rows.add(variant="finetune alone", train_tokens_per_s=alone_tps, peak_mem_gib=peak_memory_gib())
    if args.profile_alone:
        rows.add(
            variant="alone host",
            steps=args.profile_alone,
            **step_phases(runtime, HOST_PHASES, args.profile_alone),
        )
        profile_host(runtime, args.profile_alone, args.metrics_dir)

    for unified_run, (i, rate) in itertools.product(args.unified_run, enumerate(args.rates)):
        runtime.runtime_config = dataclasses.replace(
            runtime.runtime_config, unified_run=unified_run
        )
        name = f"unified_rate{rate:g}" + (f"_run{unified_run}" if len(args.unified_run) > 1 else "")
        log_path = args.metrics_dir and f"{args.metrics_dir}/{name}.jsonl"
        metrics, arrived, finished, trained = run_load(
            runtime, rate, duration, drain, shapes, seed=100 + i, log_path=log_path
        )
        summary = metrics.summary()["overall"]
        # Each call's time goes to the kind of step it landed (waited for).
        kinds = {
            f"{kind}_{key}": value
            for kind, totals in summary["step_kinds"].items()
            for key, value in (
                ("steps", totals["steps"]),
                ("step_ms", 1e3 * totals["seconds"] / totals["steps"]),
                ("time_share", totals["seconds"] / summary["seconds"]),
            )
        }
        met = sum(r.meets(SLO) for r in metrics.requests)
        records = metrics.requests
        rows.add(
            variant=f"rate {rate:g}/s",
            rate=rate,
            unified_run=unified_run,
            requests=arrived,
            finished=finished,
            ttft_p50=summary["ttft_s"]["p50"],
            ttft_p99=summary["ttft_s"]["p99"],
            tpot_p50=summary["tpot_s"]["p50"],
            tpot_p99=summary["tpot_s"]["p99"],
            itl_p99=percentiles(t for r in records for t in r.gaps_s)["p99"],
            slo_attainment=met / arrived if arrived else None,
            serve_tokens_per_s=summary["serving_tokens_per_s"],
            train_tokens_per_s=trained / duration,
            vs_alone=trained / duration / alone_tps,
            steps=summary["steps"],
            **kinds,
            peak_mem_gib=peak_memory_gib(),
        )
    rows.table(
        [
            "variant",
            "unified_run",
            "requests",
            "finished",
            "ttft_p50",
            "ttft_p99",
            "tpot_p50",
            "tpot_p99",
            "slo_attainment",
            "train_tokens_per_s",
            "vs_alone",
            "unified_steps",
            "unified_step_ms",
            "unified_time_share",
            "serve_steps",
            "serve_step_ms",
        ]
    )


if __name__ == "__main__":
    main()
