"""Shared pieces of the end-to-end benchmarks: the Llama-3-8B-shaped model with random
weights, random adapters, device ceilings, and JSON rows.

The model is built directly on the device: its parameters' shapes come from
``nnx.eval_shape`` and one jitted call draws them (normal(0, 0.02); norm scales 1), so the
8B parameters never exist on the host. ``--tiny`` configurations exercise every path on a
CPU (interpreted kernels) in seconds.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loqjax import CausalLM, LoraAdapter, ModelConfig
from loqjax.lora import TARGET_MODULES
from loqjax.unified import TrainSequence, UnifiedBatch

LLAMA3_8B = ModelConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
)
TINY = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
)
GIB = 2**30


def model_config(tiny: bool) -> ModelConfig:
    return TINY if tiny else LLAMA3_8B


def random_model(config: ModelConfig, dtype=jnp.bfloat16, seed: int = 0) -> CausalLM:
    """A ``CausalLM`` of ``config`` with random weights drawn on the default device.

    One small jitted draw per distinct weight shape (a handful), not one program for the
    whole model: that one took ~100 s to compile for the 8B shape on an H200."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = [
        jnp.ones(leaf.shape, leaf.dtype)
        if leaf.ndim == 1  # norm scales (no bias in this config)
        else _normal(key, leaf.shape, leaf.dtype)
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, drawn))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def num_matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a token's matmuls: every projection and the head."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    attention = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads)
    return config.num_layers * (attention + 3 * d * f) + config.vocab_size * d


def random_adapter(model: CausalLM, rank: int, alpha: float, seed: int) -> LoraAdapter:
    """A random adapter on all seven projections: A ~ U(+-1/sqrt(d_in)) like PEFT's init,
    B ~ normal(0, 0.02) instead of PEFT's zeros, so that it changes the output (the cost is
    the same)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, layer in enumerate(model.layers):
        for name, parent in TARGET_MODULES.items():
            d_in, d_out = getattr(getattr(layer, parent), name).kernel.shape
            bound = 1.0 / np.sqrt(d_in)
            a = rng.uniform(-bound, bound, (d_in, rank)).astype(np.float32)
            b = (0.02 * rng.standard_normal((rank, d_out))).astype(np.float32)
            weights[i, name] = (a, b)
    return LoraAdapter(rank, alpha, weights)


def load_adapters(registry, model: CausalLM, count: int, rank: int = 8, alpha: float = 16.0):
    """Loads adapters "a0" .. "a{count-1}" into their own slots. Four distinct random
    weight sets are cycled (drawing 64 distinct 8B-sized adapters costs host time; a
    kernel's cost does not depend on the values it reads)."""
    distinct = [random_adapter(model, rank, alpha, seed) for seed in range(min(count, 4))]
    for i in range(count):
        registry.load(f"a{i}", distinct[i % len(distinct)])
    return [f"a{i}" for i in range(count)]


def device_name() -> str:
    device = jax.devices()[0]
    return getattr(device, "device_kind", device.platform)


def measure_ceilings(tiny: bool) -> dict:
    """The device's bf16 matmul rate and copy bandwidth, measured now (median of 5).

    A chain of dependent matmuls (8192^3) and of elementwise passes over a 2 GiB array
    (``y + 1``: bytes read plus written), on random data."""
    n, copy_elems, iters = (256, 2**20, 2) if tiny else (8192, 2**30, 10)
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (copy_elems,), jnp.bfloat16)

    @jax.jit
    def matmuls(a):
        def body(_, c):
            return (c @ a).astype(jnp.bfloat16) * 0.01

        return jax.lax.fori_loop(0, iters, body, a)

    @jax.jit
    def copies(x):
        return jax.lax.fori_loop(0, iters, lambda _, y: y + 1, x)

    def median_time(fn, arg):
        fn(arg).block_until_ready()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn(arg).block_until_ready()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    matmul_s = median_time(matmuls, a) / iters
    copy_s = median_time(copies, x) / iters
    return {
        "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
        "copy_tb_per_s": 2 * 2 * copy_elems / copy_s / 1e12,
    }


def _profiler_trace(run) -> tuple[list[dict], dict]:
    """The perfetto events of one ``run()`` (blocked on), and {(pid, tid): name} of the
    trace's processes and threads."""
    import glob
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready(run())
        [path] = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")
    }
    return events, threads


def _on_stream(event: dict, threads: dict) -> bool:
    return "Stream" in threads.get((event.get("pid"), event.get("tid")), "")


def kernel_profile(run, top: int | None = 25) -> list[dict]:
    """The ``top`` GPU kernels (all of them with None) of one ``run()`` by total device
    time, from a profiler trace: [{"kernel", "calls", "total_ms", "share", "idle_ms"}],
    ``idle_ms`` being the time the stream sat idle just before that kernel's launches
    (launch-bound gaps land there); then {"kernel": "ALL", "calls", "total_ms",
    "idle_ms", "span_ms"}, span being first start to last end. Only the ALL row off GPU."""
    import collections

    events, threads = _profiler_trace(run)
    kernels = sorted(
        (e for e in events if e.get("ph") == "X" and _on_stream(e, threads)),
        key=lambda e: e["ts"],
    )
    totals, calls, idle = collections.Counter(), collections.Counter(), collections.Counter()
    end = kernels[0]["ts"] if kernels else 0.0
    for e in kernels:
        name = e["name"][:80]
        totals[name] += e["dur"]
        calls[name] += 1
        idle[name] += max(0.0, e["ts"] - end)
        end = max(end, e["ts"] + e["dur"])
    everything = sum(totals.values()) or 1
    span = end - kernels[0]["ts"] if kernels else 0.0
    return [
        {
            "kernel": k,
            "calls": calls[k],
            "total_ms": v / 1e3,
            "share": v / everything,
            "idle_ms": idle[k] / 1e3,
        }
        for k, v in totals.most_common(top)
    ] + [
        {
            "kernel": "ALL",
            "calls": sum(calls.values()),
            "total_ms": everything / 1e3,
            "idle_ms": sum(idle.values()) / 1e3,
            "span_ms": span / 1e3,
        }
    ]


def host_profile(run, top: int | None = 40) -> list[dict]:
    """Where the host's time goes in one ``run()``: the ``top`` host-side trace events (all
    of them with None; XLA's and PjRt's TraceMe scopes, Python calls) by self time, the
    time inside an event and not inside an event nested in it on the same thread:
    [{"thread", "event", "calls", "self_ms", "total_ms"}]. Numbers in the events' names
    (fusion.12, thunk ids) are dropped so that one kind of launch sums to one row."""
    import collections
    import re

    events, threads = _profiler_trace(run)
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and not _on_stream(e, threads):
            by_thread[(e["pid"], e.get("tid"))].append(e)
    self_us, total_us, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for key, thread_events in by_thread.items():
        thread = re.sub(r"\d+", "#", threads.get(key, str(key[1])))
        # Parents first: earlier start, and the longer of two that start together.
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_events: list[tuple[float, tuple]] = []  # (end, row key) of the enclosing events
        for e in thread_events:
            while open_events and open_events[-1][0] <= e["ts"]:
                open_events.pop()
            row = (thread, re.sub(r"\d+", "#", e["name"])[:100])
            if open_events:
                self_us[open_events[-1][1]] -= e["dur"]
            self_us[row] += e["dur"]
            total_us[row] += e["dur"]
            calls[row] += 1
            open_events.append((e["ts"] + e["dur"], row))
    return [
        {
            "thread": thread,
            "event": event,
            "calls": calls[(thread, event)],
            "self_ms": us / 1e3,
            "total_ms": total_us[(thread, event)] / 1e3,
        }
        for (thread, event), us in self_us.most_common(top)
    ]


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / GIB


def step_phases(engine, phases: dict[str, str], steps: int) -> dict:
    """Mean ms per ``engine.step()`` of each of its parts: ``phases`` maps a phase to the
    name of the engine's method (or callable attribute) it times, each wrapped for
    ``steps`` steps. Returns ``phase_{phase}_ms``, ``phase_rest_ms`` (the step's other
    time), ``phase_step_ms``, and for the phase "dispatch" the fraction of dispatches that
    found the step in flight finished before (``ready_before``) and after
    (``ready_after``) they ran: a dispatch that only returns once the step before it has
    finished serializes the host's work with the device's."""
    spent = dict.fromkeys(phases, 0.0)
    ready = {"ready_before": 0, "ready_after": 0}

    def timed(phase, fn):
        def call(*args, **kwargs):
            in_flight = engine._in_flight if phase == "dispatch" else None
            if in_flight is not None:
                ready["ready_before"] += in_flight.next_tokens.is_ready()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            spent[phase] += time.perf_counter() - start
            if in_flight is not None:
                ready["ready_after"] += in_flight.next_tokens.is_ready()
            return result

        return call

    originals = {name: getattr(engine, name) for name in phases.values()}
    attributes = {name: vars(engine)[name] for name in phases.values() if name in vars(engine)}
    for phase, name in phases.items():
        setattr(engine, name, timed(phase, originals[name]))
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - start
    finally:
        for name in phases.values():  # back to the class's methods and own attributes
            delattr(engine, name)
        vars(engine).update(attributes)
    ms = {f"phase_{phase}_ms": s / steps * 1e3 for phase, s in spent.items()}
    ms["phase_rest_ms"] = (total - sum(spent.values())) / steps * 1e3
    ms["phase_step_ms"] = total / steps * 1e3
    return ms | {key: count / steps for key, count in ready.items()}


class Rows:
    """JSON rows of a benchmark: each appended to ``path`` (if any) at once, flushed, so a
    run cut short keeps what it measured; ``table`` prints them."""

    def __init__(self, benchmark: str, path: str | None):
        self.benchmark = benchmark
        self.path = None if path is None else Path(path)
        self.rows: list[dict] = []
        self.context = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device_name(),
            "jax": jax.__version__,
            "python": platform.python_version(),
            "command": shlex.join([sys.executable, *sys.argv]),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, **fields) -> dict:
        row = {"benchmark": self.benchmark, **fields, **self.context}
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in self.context}), flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def table(self, columns: list[str]) -> None:
        print("\n" + " | ".join(columns))
        print(" | ".join("---" for _ in columns))
        for row in self.rows:
            print(" | ".join(_cell(row.get(c)) for c in columns))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


@dataclasses.dataclass
class Timer:
    """Wall-clock seconds of a ``with`` block."""

    seconds: float = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start


def random_training_batch(
    rng: np.random.Generator,
    vocab_size: int,
    num_adapters: int,
    seqs_per_adapter: int,
    seq_len: int,
    num_slots: int,
    placement: jax.sharding.Sharding | None = None,
    *,
    step_seqs: int | None = None,
    step: int = 0,
) -> UnifiedBatch:
    """A training-only unified batch: ``seqs_per_adapter`` random sequences of ``seq_len``
    ids for each of slots ``0..num_adapters-1`` (one update of each), packed without
    padding.

    With ``step_seqs`` S, the updates' sequences are spread over steps of S instead: taken
    round-robin over the adapters (slot 0's first, slot 1's first, ..., slot 0's second,
    ...), the batch of step ``step`` holds the next S; a slot applies its update at the
    step with its last sequence and only accumulates before (``UnifiedBatch.accumulate``).
    """
    order = [(slot, j) for j in range(seqs_per_adapter) for slot in range(num_adapters)]
    step_seqs = step_seqs or len(order)
    if len(order) % step_seqs:
        raise ValueError(f"{len(order)} sequences an update round do not split into {step_seqs}s")
    start = step * step_seqs % len(order)
    chosen = sorted(order[start : start + step_seqs])
    train = [
        TrainSequence(slot, rng.integers(0, vocab_size, seq_len, np.int32)) for slot, _ in chosen
    ]
    applied = {slot for slot, j in chosen if j == seqs_per_adapter - 1}
    return UnifiedBatch.pack(
        train,
        [],
        num_train_rows=step_seqs * seq_len,
        num_serve_rows=0,
        num_segments=len(train) + 1,
        num_samples=0,
        num_slots=num_slots,
        accumulate=[slot for slot in range(num_slots) if slot not in applied],
        placement=placement,
    )
