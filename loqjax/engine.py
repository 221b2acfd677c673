"""The serving engine: requests in, tokens out, continuously batched over a paged KV cache.

    engine = Engine(model, registry, tokenizer, EngineConfig(...))
    handle = engine.submit("Once upon a time", adapter="poet",
                           sampling=SamplingParams(temperature=0.7, max_tokens=64))
    for event in handle:  # tokens and text as they are produced
        print(event.text, end="")
    output = handle.result()

Single-threaded: ``step()`` schedules and dispatches one jitted step for every admitted
request (see ``scheduler``), then reads back the tokens of the step before it, so the host
packs a step while the device runs the previous one; iterating a handle or asking for its
result steps the engine until there is something to return. Requests are checked at submit; a
rejected one raises and leaves the engine as it was.

Each step runs at the smallest of ``EngineConfig.token_buckets`` that holds its scheduled
tokens (one compiled step per bucket, and per set of sampler stages its requests need:
``loqjax.sampling.SamplingStages``), so decode steps need not pay for a full prefill
batch. ``loqjax.runtime.Runtime`` is an engine whose steps also fine-tune adapters.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import GenerationConfig, PreTrainedTokenizerBase

from loqjax import sharding
from loqjax.adapter import UnknownAdapterError
from loqjax.hf_checkpoint import load_model
from loqjax.kv_cache import init_kv_cache
from loqjax.lora import TARGET_MODULES, add_lora_tables
from loqjax.metrics import BASE
from loqjax.model import CausalLM
from loqjax.registry import AdapterRegistry
from loqjax.request import (
    FinishReason,
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestOutput,
    StreamEvent,
)
from loqjax.sampling import ARGMAX_ONLY, SamplingParams, SamplingStages
from loqjax.scheduler import Chunk, EngineConfig, Scheduler, SequenceState
from loqjax.serve_step import PendingTokens, ServeBatch, ServeRows, serve_step
from loqjax.tokenization import Prompt, TextStream, encode_prompt, load_tokenizer

# The id of a token that a step in flight has sampled and the host has not read back yet.
PENDING = -1


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started.

    Attributes:
      computed_tokens: prompt, recomputed and decode tokens run through the model.
      preemptions: sequences whose pages were taken back to let older ones grow.
    """

    steps: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0


class _Request:
    """An accepted request's output side: generated ids, text, pending stream events and
    when each token came back (on the engine's clock)."""

    def __init__(
        self,
        seq: SequenceState,
        stop_ids: frozenset[int],
        text: TextStream | None,
        max_seq_len: int,
        arrival: float,
    ):
        self.seq = seq
        self.stop_ids = stop_ids
        self.text = text
        self.max_seq_len = max_seq_len
        self.arrival = arrival
        self.token_times: list[float] = []
        self.events: collections.deque[StreamEvent] = collections.deque()
        self.finish_reason: FinishReason | None = None

    def take_token(self, index: int, token_id: int, now: float) -> FinishReason | None:
        """Puts a sampled token at ``index`` of the sequence's ids (its placeholder, or
        appended) and its stream event; returns why the request is done, or None if it
        goes on."""
        seq = self.seq
        if index < len(seq.token_ids):
            assert seq.token_ids[index] == PENDING, (index, seq.token_ids[index])
            seq.token_ids[index] = token_id
        else:
            seq.token_ids.append(token_id)
        self.token_times.append(now)
        reason, text = None, ""
        if token_id in self.stop_ids:
            reason = "stop"
        elif self.text is not None:
            text = self.text.add(token_id)
            reason = "stop" if self.text.stopped else None
        if reason is None and self.is_last(index):
            reason = "length"
        if reason is not None and self.text is not None:
            text += self.text.finish()
        self.events.append(StreamEvent(token_id, text))
        return reason

    def is_last(self, index: int) -> bool:
        """Whether a token at ``index`` of the ids reaches ``max_tokens`` or the context."""
        seq = self.seq
        return index + 1 - seq.prompt_len >= seq.params.max_tokens or index + 1 >= self.max_seq_len

    def output(self) -> RequestOutput:
        seq = self.seq
        known = len(seq.token_ids)
        while seq.token_ids[known - 1] == PENDING:  # sampled by a step in flight
            known -= 1
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=tuple(seq.token_ids[: seq.prompt_len]),
            token_ids=tuple(seq.token_ids[seq.prompt_len : known]),
            text=None if self.text is None else self.text.text,
            finish_reason=self.finish_reason,
            arrival_time=self.arrival,
            token_times=tuple(self.token_times),
        )


class RequestHandle:
    """A submitted request: iterate it for its ``StreamEvent``s as they are produced, or
    call ``result()``; both step the engine as needed."""

    def __init__(self, engine: Engine, request: _Request):
        self._engine = engine
        self._request = request

    @property
    def request_id(self) -> int:
        return self._request.seq.request_id

    @property
    def done(self) -> bool:
        return self._request.finish_reason is not None

    def __iter__(self) -> Iterator[StreamEvent]:
        """Yields each generated token once, in order, until the request finishes."""
        events = self._request.events
        while True:
            while events:
                yield events.popleft()
            if self.done:
                return
            self._engine.step()

    def result(self) -> RequestOutput:
        """Steps the engine until this request finishes; its final output."""
        while not self.done:
            self._engine.step()
        return self._request.output()

    def output(self) -> RequestOutput:
        """The output so far, without stepping."""
        return self._request.output()

    def cancel(self) -> None:
        """Stops the request and frees its pages; a no-op once it is done."""
        self._engine._finish(self._request, "cancelled")


# The tokens a step samples: (row of its next tokens, sequence, index in the sequence's
# ids) each, see ``Engine._begin``.
Sampled = tuple[tuple[int, SequenceState, int], ...]


class _InFlight(NamedTuple):
    """A dispatched serving step whose next tokens have not been read back."""

    scheduled: ScheduledStep
    next_tokens: jax.Array  # int32 [S], on the device
    sampled: Sampled


@dataclasses.dataclass(frozen=True)
class ScheduledStep:
    """What one step computes for serving: the chunks and each chunk's adapter slot."""

    chunks: tuple[Chunk, ...]
    adapter_slots: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(chunk.length for chunk in self.chunks)


class Engine:
    """Serves one base model and the adapters of its registry to many requests at once.

    The model's state is split once: it holds the model's variables themselves, so
    adapters that ``registry`` loads, replaces or unloads later are served from the next
    step on, without recompiling.
    """

    def __init__(
        self,
        model: CausalLM,
        registry: AdapterRegistry | None = None,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        config: EngineConfig | None = None,
        *,
        eos_token_ids: Sequence[int] | None = None,
        cache_dtype: jnp.dtype | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """
        Args:
          model: the base model, with the adapter tables of ``registry`` if given.
          registry: the adapters requests may name; None serves the base model only.
          tokenizer: a tokenizer or a local checkpoint directory to load one from;
            needed for text and chat prompts, stop strings and output text.
          config: batch shapes and the KV cache pool; default ``EngineConfig()``.
          eos_token_ids: ids that end every request (unless it ignores them); default
            the tokenizer's end-of-sequence id, if any.
          cache_dtype: KV cache dtype; default the model's parameter dtype.
          seed: draws the seeds of requests that bring none.
          clock: seconds, for request arrival and token times; injectable for tests.
        """
        model_config = model.config
        config = config or EngineConfig()
        if config.max_seq_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len={config.max_seq_len} exceeds the model's "
                f"max_position_embeddings={model_config.max_position_embeddings}"
            )
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer(tokenizer)
        if eos_token_ids is None:
            eos = None if tokenizer is None else tokenizer.eos_token_id
            eos_token_ids = () if eos is None else (eos,)
        self.config = config
        self.model_config = model_config
        self.registry = registry
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.clock = clock
        self._bind_model(model)
        dtype = cache_dtype or model.embed_tokens.embedding.dtype
        pool = (model_config, config.num_pages, config.page_size, dtype)
        # On a device mesh (``loqjax.sharding.shard_model``): the pools split along their
        # heads like the model's KV projections, every batch on every device.
        self.mesh = model.mesh
        if self.mesh is None:
            self._cache, self._placement = init_kv_cache(*pool), None
        else:
            self._cache = sharding.init_cache(*pool, self.mesh)
            self._placement = sharding.replicated(self.mesh)
        self._scheduler = Scheduler(config)
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        self._stats = EngineStats()
        self._in_flight: _InFlight | None = None
        gc.freeze()  # see _freeze_garbage; collecting first costs a full collection

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: EngineConfig | None = None,
        *,
        dtype: jnp.dtype = jnp.float32,
        num_adapter_slots: int = 0,
        max_lora_rank: int = 16,
        target_modules: Sequence[str] = tuple(TARGET_MODULES),
        **kwargs,
    ) -> Engine:
        """An engine for a local HF checkpoint, with its tokenizer and the end-of-sequence
        ids of its generation config; with ``num_adapter_slots`` > 0 it gets adapter
        tables and an empty ``registry`` to load adapters into. Other keyword arguments
        go to ``Engine``."""
        _, model = load_model(path, dtype)
        registry = None
        if num_adapter_slots:
            add_lora_tables(
                model,
                num_slots=num_adapter_slots,
                max_rank=max_lora_rank,
                target_modules=target_modules,
            )
            registry = AdapterRegistry(model)
        tokenizer = load_tokenizer(path)
        if "eos_token_ids" not in kwargs:
            kwargs["eos_token_ids"] = _checkpoint_eos_ids(path, tokenizer)
        return cls(model, registry, tokenizer, config, **kwargs)

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats, preemptions=self._scheduler.num_preemptions)

    @property
    def num_free_pages(self) -> int:
        return self._scheduler.pool.num_free

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not finished yet, waiting or running."""
        return len(self._requests)

    def submit(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        sampling: SamplingParams | None = None,
        *,
        arrival: float | None = None,
    ) -> RequestHandle:
        """Queues a request; it runs as ``step()`` is called.

        Args:
          prompt: text (tokenized with special tokens), chat messages (rendered by the
            tokenizer's chat template, with the generation prompt), or token ids.
          adapter: a name loaded in the registry, or None for the base model.
          sampling: default ``SamplingParams()``.
          arrival: when the request arrived, on the engine's clock (default now): a
            front end that queued it passes its arrival, which its latencies count from.

        Raises:
          InvalidPromptError: empty, malformed or out-of-vocabulary prompt, or text
            without a tokenizer.
          PromptTooLongError: the prompt has ``max_seq_len`` tokens or more.
          InvalidSamplingParamsError: not ``SamplingParams``, stop ids out of the
            vocabulary, or stop strings without a tokenizer.
          UnknownAdapterError: the adapter is not loaded.
        """
        params = SamplingParams() if sampling is None else sampling
        if not isinstance(params, SamplingParams):
            raise InvalidSamplingParamsError(
                f"sampling must be SamplingParams, got {type(params).__name__}"
            )
        ids = encode_prompt(prompt, self.tokenizer)
        vocab = self.model_config.vocab_size
        outside = [i for i in ids if not 0 <= i < vocab]
        if outside:
            raise InvalidPromptError(
                f"token ids {outside[:8]} are outside the vocabulary [0, {vocab})"
            )
        if len(ids) >= self.config.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; max_seq_len={self.config.max_seq_len} "
                "must leave room for a generated token"
            )
        outside = [i for i in params.stop_token_ids if i >= vocab]
        if outside:
            raise InvalidSamplingParamsError(
                f"stop_token_ids {outside} are outside the vocabulary [0, {vocab})"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidSamplingParamsError("stop strings need a tokenizer; the engine has none")
        if adapter is not None:
            if self.registry is None:
                raise UnknownAdapterError(f"adapter {adapter!r}: the engine serves no adapters")
            self.registry.info(adapter)

        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**32))
        seq = SequenceState(next(self._ids), list(ids), len(ids), adapter, params, seed)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        text = None if self.tokenizer is None else TextStream(self.tokenizer, params.stop)
        arrival = self.clock() if arrival is None else arrival
        request = _Request(seq, frozenset(stop_ids), text, self.config.max_seq_len, arrival)
        self._requests[seq.request_id] = request
        self._scheduler.add(seq)
        return RequestHandle(self, request)

    def warmup(self, sampling: Sequence[SamplingParams] = ()) -> None:
        """Compiles every step variant on empty batches (the serving step at each token
        bucket; a ``Runtime``'s unified step too), which change no cache entry, weight or
        optimizer state, so that later steps run warm from the first.

        Args:
          sampling: the sampling parameters traffic will use besides greedy. The
            sampler's stages are static (``SamplingStages``): a step variant is compiled
            for every mix of requests with these parameters.
        """
        for stages in SamplingStages.combinations(sampling):
            self._warm_variant(stages)
        _freeze_garbage()  # and the compiled steps' objects

    def _warm_variant(self, sampling_stages: SamplingStages) -> None:
        for bucket in self.config.token_buckets:
            self._serve(ScheduledStep((), ()), bucket, sampling_stages)

    def step(self) -> bool:
        """Dispatches one step for every scheduled request, then reads back the tokens of
        the step dispatched before it; False if there was nothing to do.

        Steps are pipelined: the host schedules and packs step N + 1 while the device runs
        step N, and the tokens step N samples reach step N + 1 on the device (see
        ``PendingTokens``). A request that step N finishes may have a row in step N + 1;
        it is computed and dropped.
        """
        return self._advance(self._schedule()) is not None or self._scheduler.has_work

    def _advance(self, scheduled: ScheduledStep | None) -> dict[str, int] | None:
        """Dispatches ``scheduled`` (if any), then reads back and commits the step that was
        in flight (if any): its generated tokens per adapter (see ``_commit``); None if
        there was neither."""
        launched = None if scheduled is None else self._launch(scheduled)
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            return None if launched is None else {}
        return self._land(previous)

    def _land(self, flight: _InFlight) -> dict[str, int]:
        """Reads back and commits a step that was in flight (see ``_commit``)."""
        return self._commit(flight.scheduled, np.asarray(flight.next_tokens), flight.sampled)

    def _launch(
        self,
        scheduled: ScheduledStep,
        bucket: int | None = None,
        sampling_stages: SamplingStages = ARGMAX_ONLY,
    ) -> _InFlight:
        """Dispatches a serving step (arguments as for ``_batch``), its pending tokens
        taken from the step in flight."""
        batch = self._batch(scheduled, bucket, sampling_stages)
        if (pending := self._pending(scheduled)) is not None:
            batch = batch.with_pending(self._in_flight.next_tokens, pending)
        sampled = self._begin(scheduled)
        next_tokens, self._cache = self._serve_step(self._serving_leaves(), self._cache, batch)
        return _InFlight(scheduled, next_tokens, sampled)

    def _pending(self, scheduled: ScheduledStep) -> PendingTokens | None:
        """Where the step's placeholders get their tokens from the step in flight, or None
        if it has none."""
        flight = self._in_flight
        if flight is None:
            return None
        rows = {id(seq): row for row, seq, _ in flight.sampled}
        s, seen_capacity = self.config.max_seqs, self.config.max_seq_len
        source = np.full(s, -1, np.int32)
        token_rows = np.zeros(s, np.int32)
        seen_cols = np.full(s, seen_capacity, np.int32)
        offset = 0
        for row, chunk in enumerate(scheduled.chunks):
            seq = chunk.seq
            offset += chunk.length
            if seq.token_ids[chunk.stop - 1] == PENDING:
                source[row] = rows[id(seq)]
                token_rows[row] = offset - 1
                if seq.params.repetition_penalty != 1.0:
                    seen_cols[row] = chunk.stop - 1
        return PendingTokens(source, token_rows, seen_cols) if (source >= 0).any() else None

    def _begin(self, scheduled: ScheduledStep) -> Sampled:
        """Marks a packed step's chunks computed; returns (row, sequence, index) of each
        token the step samples, index being where it goes in the sequence's ids. A
        sequence that goes on gets a ``PENDING`` placeholder there, so the next step can
        be scheduled before this one's tokens are read back."""
        sampled = []
        for row, chunk in enumerate(scheduled.chunks):
            seq = chunk.seq
            produces = chunk.stop == len(seq.token_ids)  # its last row's logits pick a token
            seq.num_computed = chunk.stop
            if produces:
                index = len(seq.token_ids)
                if not self._requests[seq.request_id].is_last(index):
                    seq.token_ids.append(PENDING)
                sampled.append((row, seq, index))
        return tuple(sampled)

    # --- the parts of a step, shared with the runtime -----------------------------------

    def _bind_model(self, model: CausalLM) -> None:
        self._graphdef, state = nnx.split(model)
        # The state's variables see the registry's writes to the model: their current
        # values are what a step serves (read as a list: see ``_serving_leaves``).
        self._variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        for variable in self._variables:
            if variable.get_value() is not variable.get_raw_value():
                raise ValueError(
                    f"{type(variable).__name__} variable of shape {variable.shape} has a value "
                    "hook or an array ref; the engine serves plain array variables"
                )
        self._serve_step = serve_step(self._graphdef, jax.tree.structure((state,)))

    def _serving_leaves(self) -> list[jax.Array]:
        """The leaves of the states that ``nnx.merge`` with the graphdef into the model
        to serve, in the order of the serving step's ``states_def``.

        Raw values (checked plain in ``_bind_model``): ``get_value`` costs ~15 µs a
        variable on a CPU core, 15 ms a step for the 963 variables of the Llama-3-8B shape
        with adapter tables, ``get_raw_value`` 0.4 µs."""
        return [variable.get_raw_value() for variable in self._variables]

    def _schedule(self, budget: int | None = None) -> ScheduledStep | None:
        """The next step's chunks within ``budget`` tokens (default the token capacity),
        ordered by adapter slot, or None if there are none; requests whose adapter was
        unloaded are aborted.

        In slot order, the rows of an adapter are contiguous: one LoRA segment, whose
        weights the kernels load once per tile of rows instead of once per sequence."""
        scheduled = []
        for chunk in self._scheduler.schedule(budget):
            slot = self._adapter_slot(chunk.seq.adapter)
            if slot is None:  # unloaded since submit: the request cannot go on
                self._finish(self._requests[chunk.seq.request_id], "aborted")
            else:
                scheduled.append((slot, chunk))
        if not scheduled:
            return None
        scheduled.sort(key=lambda pair: pair[0])  # stable: the scheduler's order per slot
        slots, chunks = zip(*scheduled, strict=True)
        return ScheduledStep(chunks, slots)

    def _bucket(self, num_tokens: int) -> int:
        """The smallest token bucket that holds ``num_tokens``."""
        return min(b for b in self.config.token_buckets if b >= num_tokens)

    def _batch(
        self,
        scheduled: ScheduledStep,
        bucket: int | None = None,
        sampling_stages: SamplingStages = ARGMAX_ONLY,
    ) -> ServeBatch:
        """The device batch of a serving-only step at ``bucket`` rows (default the
        smallest that holds the chunks), running at least ``sampling_stages``."""
        rows = ServeRows.pack(
            scheduled.chunks,
            scheduled.adapter_slots,
            self.config,
            self.model_config.vocab_size,
            num_rows=bucket or self._bucket(scheduled.num_tokens),
            sampling_stages=sampling_stages,
        )
        return ServeBatch.of(rows, self._placement)

    def _serve(
        self,
        scheduled: ScheduledStep,
        bucket: int | None = None,
        sampling_stages: SamplingStages = ARGMAX_ONLY,
    ) -> tuple[np.ndarray, Sampled]:
        """Runs a serving-only step to the end (arguments as for ``_batch``): int32 [S]
        next token of every row, and ``_begin``'s sampled tokens for ``_commit``."""
        flight = self._launch(scheduled, bucket, sampling_stages)
        return np.asarray(flight.next_tokens), flight.sampled

    def _commit(
        self, scheduled: ScheduledStep, next_tokens: np.ndarray, sampled: Sampled
    ) -> dict[str, int]:
        """Records a step's results: computed tokens and the tokens ``_begin`` listed
        (those of requests finished meanwhile are dropped).

        Returns:
          Generated tokens per adapter name (``BASE`` for the base model).
        """
        now = self.clock()
        self._stats.steps += 1
        self._stats.computed_tokens += scheduled.num_tokens
        generated: dict[str, int] = {}
        for row, seq, index in sampled:
            request = self._requests.get(seq.request_id)
            if request is None:
                continue  # finished (or cancelled) while this step was in flight
            self._stats.generated_tokens += 1
            name = BASE if seq.adapter is None else seq.adapter
            generated[name] = generated.get(name, 0) + 1
            reason = request.take_token(index, int(next_tokens[row]), now)
            if reason is not None:
                self._finish(request, reason)
        return generated

    def run_until_idle(self) -> None:
        """Steps until every submitted request has finished."""
        while self.step():
            pass

    def _adapter_slot(self, adapter: str | None) -> int | None:
        """The adapter's table slot, -1 for the base model, None if it is not loaded."""
        if adapter is None:
            return -1
        info = self.registry.adapters.get(adapter)
        return None if info is None else info.slot

    def _finish(self, request: _Request, reason: FinishReason) -> None:
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        ids = request.seq.token_ids
        while ids[-1] == PENDING:  # a token of a step in flight: dropped
            ids.pop()
        self._scheduler.remove(request.seq)
        del self._requests[request.seq.request_id]
        self._on_finish(request)

    def _on_finish(self, request: _Request) -> None:
        """Called once per request as it finishes, however it finishes."""


def _freeze_garbage() -> None:
    """Moves every object alive now out of the garbage collector's reach (``gc.freeze``).

    A model and its compiled steps are many long-lived objects, and a full collection
    scans them all: one stalled an 8B decode step by 0.34 s on an H200 host (RESULTS.md,
    run 25). Frozen, they are never scanned for cycles (reference counting still frees
    them; a cycle among them lives on, as the server's objects do anyway)."""
    gc.collect()
    gc.freeze()


def _checkpoint_eos_ids(path: str | os.PathLike, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids of a checkpoint's generation config, else its tokenizer's."""
    try:
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (eos,)
