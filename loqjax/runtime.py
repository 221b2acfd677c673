"""The unified runtime: fine-tuning jobs and serving requests on one model, one step at a time.

``Runtime`` is an ``Engine`` (requests, continuous batching with chunked prefill over the
paged KV cache, sampling, streaming, cancellation; see ``loqjax.engine``) whose steps also
fine-tune adapters. Before each step the ``StepPolicy`` decides whether it trains:

* a unified step packs the active jobs' next examples into the training rows and the
  scheduled serving chunks (decode tokens and prefill pieces, at most
  ``unified_serve_rows`` tokens) after them, and runs the unified step over the KV cache
  (``loqjax.unified``): the serving rows' next tokens come back sampled, the jobs' slots
  take their gradients, all in one jitted call;
* a serving step is the engine's step, at its token buckets.

Serving steps are pipelined as ``Engine.step``'s are: a call packs and dispatches its
step before it reads back the step before, whose sampled tokens reach the new step's rows
on the device (the policy's deadlines count the tokens in flight). A unified step after a
unified step, or after a serving step, is pipelined so too (``RuntimeConfig.pipeline``).
The host keeps each job's rows and updates as dispatched, so it can plan the next step's
examples and updates before the last one's losses are back, and ``land`` reads back and
commits the step in flight. A step in flight whose landing evaluates a job (at its
``eval_every`` updates and its last) is landed before the next is dispatched, so the
held-out loss is that of the weights of its update. Unpipelined, a unified step lands the
step before it, then runs to the end.

With no request in flight a training step is the same unified step, its serving rows
padding: one compiled training step in all (per set of sampler stages of its serving
rows, ``loqjax.sampling.SamplingStages``; ``Runtime.warmup`` compiles them up front).

A training step is much slower than a decode step, so the policy runs one only when every
request in flight can afford it against its TTFT/TPOT deadline (decode steps bank slack,
training steps spend it), and always while fine-tuning has had less than its guaranteed
share of the step time. Under load it can wait until a run of ``unified_run`` training
steps fits (default 1), then goes on while one more does.

Adapter lifecycle: ``add_job`` loads a fresh adapter into the registry under the job's
name, so requests can name it from then on and get its current weights (the tables are
shared); when the job ends it stops training, and the registry entry stays, served as any
other adapter. Adapters change through the runtime (``load_adapter``, ``replace_adapter``,
``unload_adapter``), not the registry directly: the runtime steps on its own copy of the
tables (see ``sync_model``). Jobs and requests are added between steps (one thread).

A job whose loss goes non-finite is paused (``JobRun.status`` "running" -> "paused", the
reason in ``JobRun.failure``, a "paused" metrics event): the first step in which its
micro-batch loss or gradient is NaN or infinite, or its update would make its weights
non-finite, drops that micro-batch (``SlotOptimizer``), and the job gets no training rows
from then on; every other job trains on and every request is served as before. The step
dispatched after it, before the host knew, halts the job's slot on the device
(``UnifiedBatch.halting``) and its examples go back to the job, so a pause leaves the same
weights, optimizer state and next example as it would unpipelined. Its
adapter keeps the weights the optimizer last accepted, finite (neither the registry nor
the optimizer lets a non-finite weight into the tables) and bit-identical to those before
the failing step, unless that step was to complete an update: the optimizer then applies
the update's earlier micro-batches without the dropped one. It stays loaded and servable.
Those are the weights the non-finite loss was computed with: when they are themselves what
diverged (a learning rate so large that the forward overflows), the held-out loss the
pause measures (in the event and the failure message) is not finite either, and the way
on is earlier weights (a checkpoint's, through ``replace_adapter``) before ``resume_job``.
``resume_job`` goes on training a paused job, optionally with a fresh optimizer state or
other hyperparameters.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
from flax import nnx
from jax.tree_util import PyTreeDef
from tqdm.auto import tqdm

from loqjax.adapter import LoraAdapter
from loqjax.engine import Engine, Sampled, ScheduledStep, _InFlight, _Request
from loqjax.jobs import DatasetError, DuplicateJobError, Example, FineTuneJob, epochs_of
from loqjax.leaves import Leaves
from loqjax.metrics import BASE, Metrics, RequestRecord
from loqjax.model import CausalLM
from loqjax.optim import SlotOptimizer, slot_finite
from loqjax.registry import AdapterRegistry
from loqjax.sampling import ARGMAX_ONLY, SamplingStages
from loqjax.scheduler import EngineConfig
from loqjax.serve_step import PendingTokens, ServeRows, serve_step
from loqjax.slo_scheduler import SloTargets, StepPolicy
from loqjax.unified import (
    Backward,
    StepOutput,
    TrainState,
    UnifiedBatch,
    check_backward,
    make_unified_step,
    slot_losses,
    split_model,
)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Static step shapes and the scheduling policy.

    Attributes:
      serving: the serving engine's shapes and KV cache (``EngineConfig``).
      train_rows: training rows of a training step (static). Longer steps train more
        under serving load too, the policy banking decode steps' slack before each: at
        the Llama-3-8B shape on an H200, 2048 rows kept 11,981 / 12,083 tok/s at 1 / 2
        req/s against 1024 rows' 11,110 / 11,213, every request within its TPOT
        (RESULTS.md runs 66-67, two machines).
      max_train_seqs: training sequences per step.
      unified_serve_rows: serving tokens a unified step carries, in
        [serving.max_seqs, serving.token_capacity]; default the token capacity. Smaller
        keeps training steps short under prefill load (prompts then prefill mostly in
        serving steps).
      min_train_share: share of step time fine-tuning keeps under any serving load.
      slo: TTFT/TPOT targets.
      backward: the unified step's backward strategy (see ``loqjax.unified``).
      saved_layers: with ``backward="recompute"``, how many of the last layers keep their
        activations instead of recomputing them.
      pipeline: when a unified step is dispatched before the step before it is read
        back (see above), overlapping the host's packing and dispatch (~14 ms at the
        Llama-3-8B shape under serving load, RESULTS.md run 64) with the step before it
        on the device: "always" (default);
        "no_requests" only while no request is in flight, so a step under serving load
        commits its tokens as soon as it ends; "never". 2 jobs of the Llama-3-8B shape
        on an H200, 4 serving adapters at 1/2/4 req/s (RESULTS.md runs 37-38): "always"
        trains 9,626/9,830/9,062 tok/s against "no_requests"' 8,499/8,755/7,834, both
        meeting the TPOT/TTFT SLO for every request. Pipelined behind serving steps too,
        it keeps 0.84-0.89x of fine-tuning alone at 1-2 req/s against 0.84x when a
        serving step in flight was landed first (runs 64 and 66 against 62).
      unified_run: under serving load, pipelined, the policy starts training only when
        this many unified steps in a row would meet every request's deadlines, and goes on
        while one more would (1, the default: whenever one fits). A unified step queued
        behind another costs the device's time alone, one after a serving step its host's
        packing and dispatch too (Llama-3-8B shape on an H200, 2 req/s: 81 against 106 ms
        from its start to its landing, RESULTS.md run 42). But runs of 2 trained no more
        (run 43: 8,875 / 8,602 / 7,782 tok/s at 1 / 2 / 4 req/s against 8,875 / 8,602 /
        7,646), a run's first step then taking longer, and doubled the p99 gap between
        tokens (108 -> 197 ms at 1 req/s).
    """

    serving: EngineConfig = EngineConfig(
        token_capacity=256, max_seqs=16, page_size=16, num_pages=256, max_seq_len=512
    )
    train_rows: int = 256
    max_train_seqs: int = 24
    unified_serve_rows: int | None = None
    min_train_share: float = 0.25
    slo: SloTargets = SloTargets()
    backward: Backward = "save"
    saved_layers: int = 0
    pipeline: Literal["no_requests", "always", "never"] = "always"
    unified_run: int = 1

    def __post_init__(self):
        check_backward(self.backward, self.saved_layers)
        if self.pipeline not in ("no_requests", "always", "never"):
            raise ValueError(
                f"pipeline must be 'no_requests', 'always' or 'never', got {self.pipeline!r}"
            )
        if self.train_rows < 1 or self.max_train_seqs < 1:
            raise ValueError("train_rows and max_train_seqs must be >= 1")
        if self.unified_run < 1:
            raise ValueError(f"unified_run must be >= 1, got {self.unified_run}")
        serve_rows = self.serve_rows
        if not self.serving.max_seqs <= serve_rows <= self.serving.token_capacity:
            raise ValueError(
                f"unified_serve_rows={serve_rows} must be in [max_seqs, token_capacity] = "
                f"[{self.serving.max_seqs}, {self.serving.token_capacity}]"
            )

    @property
    def serve_rows(self) -> int:
        """Serving rows of a unified step."""
        return self.unified_serve_rows or self.serving.token_capacity


JobStatus = Literal["running", "paused", "done"]


class JobRun:
    """A fine-tuning job in progress: its slot, splits, progress and losses.

    Attributes:
      updates / total_updates: optimizer updates done / planned.
      trained_tokens: training rows (tokens) it has had so far, not counting dropped
        (non-finite) micro-batches.
      train_loss, eval_loss: (update, mean completion-token loss) points.
      failure: why the job is paused, or None (see ``status``).
    """

    def __init__(self, job: FineTuneJob, slot: int, train: list[Example], held_out, total):
        self.job = job
        self.slot = slot
        self.train_examples = train
        self.eval_examples: list[Example] = held_out
        self.total_updates = total
        self.updates = 0
        self.trained_tokens = 0
        self.train_loss: list[tuple[int, float]] = []
        self.eval_loss: list[tuple[int, float]] = []
        self._stream = epochs_of(train, job.seed)
        self._next = next(self._stream)
        # As dispatched, steps in flight included: training rows since the last update,
        # and updates (see Runtime._plan).
        self._rows = 0
        self._planned = 0
        self._loss_sum = 0.0
        self._loss_tokens = 0
        self.progress: tqdm | None = None
        self.failure: str | None = None

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def done(self) -> bool:
        return self.updates >= self.total_updates

    def evaluates_at(self, update: int) -> bool:
        """The job is evaluated after ``update``: every ``eval_every`` and at its last."""
        return update >= self.total_updates or update % self.job.eval_every == 0

    @property
    def paused(self) -> bool:
        return self.failure is not None

    @property
    def status(self) -> JobStatus:
        """The job's state: "paused" after a non-finite step (until
        ``Runtime.resume_job``), else "done" once every planned update is made, else
        "running"."""
        if self.paused:
            return "paused"
        return "done" if self.done else "running"

    def take(self, room: int) -> Example | None:
        """The next training example if it fits in ``room`` rows."""
        if len(self._next.tokens) > room:
            return None
        example, self._next = self._next, next(self._stream)
        return example

    def give_back(self, examples: Sequence[Example]) -> None:
        """Puts examples that ``take`` gave back in front, in their order."""
        if examples:
            self._stream = itertools.chain([*examples[1:], self._next], self._stream)
            self._next = examples[0]


class _Planned(NamedTuple):
    """What a dispatched unified step does for one active job (``Runtime._plan``)."""

    run: JobRun
    examples: tuple[Example, ...]
    rows: int
    rows_before: int  # the job's rows since its last update, before this step
    update: int  # the update this step completes, 0 for none

    @property
    def evaluates(self) -> bool:
        """Landing this step evaluates the job."""
        return self.update > 0 and self.run.evaluates_at(self.update)


class _UnifiedFlight(NamedTuple):
    """A dispatched unified step not read back yet: ``Engine``'s ``_InFlight`` fields
    (``scheduled`` None without serving rows) and its training part."""

    scheduled: ScheduledStep | None
    next_tokens: jax.Array  # int32 [M], on the device
    sampled: Sampled
    out: StepOutput
    planned: tuple[_Planned, ...]
    stages: SamplingStages
    # When its time starts, on the runtime's clock: its call's start (after landing the
    # step before, or compiling), or the landing of the unified step queued before it.
    started_at: float = 0.0
    timed: bool = False  # its time goes into the policy's average (compiled before)
    queued: bool = False  # dispatched behind a unified step (its host work hidden)


DEFAULT_OPTIMIZER = SlotOptimizer()


@functools.cache
def _unified_step(
    graphdef: nnx.GraphDef,
    optimizer: SlotOptimizer,
    backward: Backward,
    saved_layers: int,
    leaves_of: tuple[PyTreeDef, PyTreeDef],
):
    """One jitted unified step per model structure, optimizer, backward strategy and state
    structures, shared by the runtimes that have them in common (as ``serve_step`` is by
    engines); it takes and returns leaves (``loqjax.leaves``)."""
    return make_unified_step(
        graphdef, optimizer, backward=backward, saved_layers=saved_layers, leaves_of=leaves_of
    )


@functools.cache
def _eval_losses(graphdef: nnx.GraphDef):
    return jax.jit(functools.partial(slot_losses, graphdef))


@jax.jit
def _slot_finite(params) -> jax.Array:
    return slot_finite(params)


class Runtime(Engine):
    """Serves requests and runs fine-tuning jobs on one model, one step at a time.

    Usage::

        runtime = Runtime(model, registry, tokenizer)
        runtime.add_job(FineTuneJob("upper", "upper.jsonl", steps=200))
        handle = runtime.submit("upper: abc =>", adapter="upper")
        runtime.run_until_idle()
        print(handle.result().text)

    Requests are the engine's (``submit`` -> ``RequestHandle``); stepping a handle steps
    the runtime, jobs included.
    """

    def __init__(
        self,
        model: CausalLM,
        registry: AdapterRegistry,
        tokenizer=None,
        config: RuntimeConfig | None = None,
        *,
        optimizer: SlotOptimizer | None = None,
        metrics: Metrics | None = None,
        progress: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        **engine_kwargs,
    ):
        """
        Args:
          model: the base with adapter tables; ``registry`` is bound to them.
          tokenizer: HF tokenizer (or checkpoint directory) for text prompts and text
            datasets; None for token ids only.
          config: step shapes and policy.
          optimizer: per-slot optimizer of every job (default ``DEFAULT_OPTIMIZER``,
            ``SlotOptimizer()``: AdamW; a job's ``hyperparams`` set its own slot's
            values). Runtimes of one model structure and optimizer share their compiled
            steps.
          metrics: where events go; default an in-memory ``Metrics``.
          progress: a tqdm bar per job.
          clock: seconds; injectable for tests.
          engine_kwargs: ``eos_token_ids``, ``cache_dtype``, ``seed`` of ``Engine``.
        """
        self.runtime_config = config or RuntimeConfig()
        self.optimizer = optimizer or DEFAULT_OPTIMIZER
        super().__init__(
            model, registry, tokenizer, self.runtime_config.serving, clock=clock, **engine_kwargs
        )
        self.model = model
        self.slo = self.runtime_config.slo
        self.policy = StepPolicy(self.runtime_config.min_train_share)
        self.metrics = metrics or Metrics(self.slo)
        self.progress = progress
        self.jobs: dict[str, JobRun] = {}
        backward = (self.runtime_config.backward, self.runtime_config.saved_layers)
        leaves_of = (self._frozen_leaves.treedef, self._train_leaves.treedef)
        self._step = _unified_step(self._graphdef, self.optimizer, *backward, leaves_of)
        self._losses = _eval_losses(self._graphdef)
        # Moving averages of unified steps' times, from their start to their landing, of
        # those queued behind a unified step (True) and the others (False).
        self._unified_seconds: dict[bool, float] = {}
        self._ran: set[tuple] = set()  # step variants run at least once (compiled)
        self._train_seconds = 0.0  # step time while jobs were active, training / all
        self._active_seconds = 0.0
        self._packings = 0  # training packings so far: whose turn it is to go first
        # Landed since the last metrics step event: generated and training tokens.
        self._landed_generated: dict[str, int] = {}
        self._landed_rows: dict[str, int] = {}

    def _bind_model(self, model: CausalLM) -> None:
        self._graphdef, frozen, params = split_model(model)
        # Held as leaves: the steps take and return them (loqjax.leaves).
        self._frozen_leaves = Leaves.of(frozen)
        self._train_leaves = Leaves.of(TrainState.create(params, self.optimizer))
        self._num_params = jax.tree.structure(params).num_leaves
        self._serve_step = serve_step(self._graphdef, jax.tree.structure((params, frozen)))

    @property
    def _frozen(self) -> nnx.State:
        return self._frozen_leaves.tree

    @_frozen.setter
    def _frozen(self, frozen: nnx.State) -> None:
        self._frozen_leaves = Leaves.of(frozen)

    @property
    def _state(self) -> TrainState:
        return self._train_leaves.tree

    @_state.setter
    def _state(self, state: TrainState) -> None:
        self._train_leaves = Leaves.of(state)

    def _serving_leaves(self) -> list[jax.Array]:
        # TrainState flattens params first: its leading leaves are the tables.
        return self._train_leaves.leaves[: self._num_params] + self._frozen_leaves.leaves

    # --- adapters and jobs ----------------------------------------------------------

    def sync_model(self) -> None:
        """Lands the step in flight (``land``) and writes the trained tables back into
        ``model`` (the step donates its buffers); call before reading the model or the
        registry directly (``registry.export``). Change adapters through
        ``load_adapter``, ``replace_adapter`` and ``unload_adapter``: a registry write
        donates the tables, which are then the runtime's own."""
        self.land()
        nnx.update(self.model, self._state.params)

    def land(self) -> None:
        """Reads back and commits the step in flight, if any. After it the jobs' counts,
        losses and failures and the requests' tokens agree with the tables; the methods
        that change jobs or adapters land first."""
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            self._merge_landed(self._land(flight))

    def load_adapter(self, name: str, adapter: LoraAdapter) -> int:
        """Loads a serving adapter into a free slot; returns the slot."""
        self.sync_model()
        slot = self.registry.load(name, adapter)
        self._refresh(slot)
        return slot

    def replace_adapter(self, name: str, adapter: LoraAdapter) -> int:
        """Gives adapter ``name`` new weights in its slot, served from the next step on;
        returns the slot. A paused job's adapter too (e.g. with the weights of an earlier
        checkpoint, before ``resume_job``): its optimizer state restarts then, with the
        job's hyperparameters, the micro-batches accumulated before the failure dropped;
        its update count goes on.

        Raises:
          ValueError: a running job trains ``name``;
          and the registry's ``UnknownAdapterError`` and ``check`` errors.
        """
        self.land()
        run = self.jobs.get(name)
        if run is not None and run.status == "running":
            raise ValueError(f"adapter {name!r} is being trained by a running job")
        self.sync_model()
        slot = self.registry.replace(name, adapter)
        paused = run is not None and run.paused
        self._refresh(slot, run.job.hyperparams if paused else None)
        if paused:
            run._rows, run._loss_sum, run._loss_tokens = 0, 0.0, 0
        return slot

    def unload_adapter(self, name: str) -> None:
        """Unloads a serving adapter, or the adapter of a done or paused job (the paused
        job is dropped: it cannot resume without it); requests still naming it are
        aborted at their next step.

        Raises:
          ValueError: a running job trains ``name``;
          and the registry's ``UnknownAdapterError``.
        """
        self.land()
        run = self.jobs.get(name)
        if run is not None and run.status == "running":
            raise ValueError(f"adapter {name!r} is being trained by a running job")
        slot = self.registry.info(name).slot
        self.sync_model()
        self.registry.unload(name)
        self._refresh(slot)
        if run is not None and run.paused:
            del self.jobs[name]

    def add_job(self, job: FineTuneJob) -> JobRun:
        """Starts ``job``: loads its fresh adapter (servable from now on) and measures its
        eval loss at update 0.

        Raises:
          DuplicateJobError: a job for ``job.name`` is still running, or paused.
          DatasetError: bad records, or token ids outside the vocabulary;
          ValueError: an example longer than ``train_rows``, or a hyperparameter value
            that is not a number or overflows;
          KeyError: a hyperparameter the optimizer does not have;
          and the registry's ``AdapterError``s (name taken, table full, bad config).
        """
        self.land()
        running = self.jobs.get(job.name)
        if running is not None and running.status == "running":
            raise DuplicateJobError(
                f"adapter {job.name!r} is already being trained ({running.updates} of "
                f"{running.total_updates} updates done); wait for that job to finish"
            )
        if running is not None and running.paused:
            raise DuplicateJobError(
                f"adapter {job.name!r} has a paused job ({running.failure}); resume it "
                f"with resume_job({job.name!r})"
            )
        self.optimizer.check_hyperparams(self._state.opt, job.hyperparams)
        train, held_out = job.examples(self.tokenizer)
        vocab = self.model_config.vocab_size
        if any(int(e.tokens.max()) >= vocab for e in train + held_out):
            raise DatasetError(
                f"job {job.name!r} has token ids outside the vocabulary [0, {vocab})"
            )
        longest = max(len(e.tokens) for e in train + held_out)
        if longest > self.runtime_config.train_rows:
            raise ValueError(
                f"job {job.name!r} has a {longest}-token example; train_rows is "
                f"{self.runtime_config.train_rows}"
            )
        total = job.steps or math.ceil(
            job.epochs * sum(len(e.tokens) for e in train) / job.batch_tokens
        )
        self.sync_model()
        slot = self.registry.load(job.name, job.lora.init_adapter(self.model))
        self._refresh(slot, job.hyperparams)
        run = JobRun(job, slot, train, held_out, total)
        if self.progress:
            run.progress = tqdm(total=total, desc=f"fine-tune {job.name}", leave=True)
        self.jobs[job.name] = run
        self._evaluate(run)
        return run

    def _refresh(self, slot: int, hyperparams: dict[str, float] | None = None) -> None:
        """Re-splits the model after a registry write and restarts ``slot``'s optimizer."""
        _, self._frozen, params = split_model(self.model)
        opt = self.optimizer.reset_slot(self._state.opt, params, slot)
        if hyperparams:
            opt = self.optimizer.set_hyperparams(opt, slot, **hyperparams)
        self._state = TrainState(params, opt)

    # --- the loop ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No request in flight and no job running (paused jobs wait for
        ``resume_job``)."""
        return not self._requests and all(run.status != "running" for run in self.jobs.values())

    def run_until_idle(self, between_steps: Callable[[Runtime], None] | None = None) -> None:
        """Steps until every request is answered and every job done or paused;
        ``between_steps`` runs before each step (e.g. to submit traffic)."""
        while True:
            if between_steps is not None:
                between_steps(self)
            if not self.step():
                return

    def _warm_variant(self, sampling_stages: SamplingStages) -> None:
        # The unified step too, and the policy's step-time prediction is warm from the first.
        self.land()
        super()._warm_variant(sampling_stages)
        out = self._run_unified([], self._serve_rows(ScheduledStep((), ()), sampling_stages))
        jax.block_until_ready(out.loss)
        self._ran.add(("unified", sampling_stages))

    def step(self) -> bool:
        """One step; False when there was nothing to do.

        Dispatches a unified or a serving step, then lands the step that was in flight
        (see the module docstring); unpipelined, a unified step lands the step before it
        first and itself at the end. The call's time is charged to the step it landed,
        whose device time it waited for (but for a first run's compile)."""
        start = step_start = self.clock()
        mode = self.runtime_config.pipeline
        pipeline = mode == "always" or (mode == "no_requests" and not self._requests)
        active = [run for run in self.jobs.values() if run.status == "running"]
        active = [run for run in active if run._planned < run.total_updates]
        train, scheduled, rows, landed = [], None, {}, False
        if active and self._wants_training(start, pipeline):
            flight = self._in_flight
            # Pipelined behind a serving step too: the device runs the serving step while
            # the host packs and dispatches this one.
            if flight is not None and (not pipeline or _evaluates(flight)):
                self.land()
                landed = True
                step_start = self.clock()
                self._time(_variant(flight), step_start - start, True)  # its wait
                # Landing may have paused a job or finished its update plan.
                active = [run for run in active if run.status == "running"]
            scheduled = self._schedule(self.runtime_config.serve_rows)
            train, rows = self._pack_training(active, self.runtime_config.train_rows)
        if train:
            serve = self._serve_rows(scheduled or ScheduledStep((), ()))
            flight = self._dispatch_unified(train, rows, scheduled, serve, active)
            dispatched = _variant(flight)
            timed = dispatched in self._ran
            if not timed:  # compiled: not part of any step's time
                now = self.clock()
                self._time(dispatched, now - step_start, True)
                step_start = now
            previous = self._in_flight
            self._in_flight = flight._replace(started_at=step_start, timed=timed)
            if previous is not None:
                self._merge_landed(self._land(previous))
                if isinstance(previous, _UnifiedFlight):  # the device goes on to this one
                    self._in_flight = self._in_flight._replace(started_at=self.clock(), queued=True)
            if not pipeline:
                self.land()
            charged = _variant(previous if pipeline and previous is not None else flight)
        else:
            previous = self._in_flight
            advanced = self._advance(scheduled or self._schedule())
            if advanced is None and not landed:
                return self._scheduler.has_work
            self._merge_landed(advanced or {})
            charged = ("serve", None) if previous is None else _variant(previous)
        end = self.clock()
        self._time(charged, end - step_start, bool(active))
        generated, trained = self._landed_generated, self._landed_rows
        self._landed_generated, self._landed_rows = {}, {}
        trained = {name: rows for name, rows in trained.items() if rows}
        self.metrics.step(start, end, generated, trained, charged[0])
        return True

    def _merge_landed(self, generated: dict[str, int]) -> None:
        self._landed_generated = _merged(self._landed_generated, generated)

    def _wants_training(self, now: float, pipeline: bool) -> bool:
        """Whether this step trains: one more unified step behind the one in flight, or
        a new run of ``unified_run`` of them (pipelined; else one), must meet every
        request's deadline for its run's last token."""
        flight = self._in_flight
        running = isinstance(flight, _UnifiedFlight)
        run = self.runtime_config.unified_run if pipeline and not running else 1
        in_flight = set() if flight is None else {id(seq) for _, seq, _ in flight.sampled}
        deadlines = [
            self.slo.deadline(
                r.arrival, r.token_times, int(id(r.seq) in in_flight), now, later=run - 1
            )
            for r in self._requests.values()
        ]
        share = self._train_seconds / self._active_seconds if self._active_seconds else 0.0
        predicted = self._run_seconds(now, run) if deadlines else None
        return self.policy.train_now(deadlines, now, predicted, share)

    def _run_seconds(self, now: float, run: int) -> float | None:
        """The predicted time from ``now`` to the landing of the next ``run`` unified
        steps: behind the unified step in flight, after its rest; else the first after a
        serving step, the others queued. None before any was measured."""
        seconds = self._unified_seconds
        if not seconds:
            return None
        queued = seconds.get(True, seconds.get(False))
        flight = self._in_flight
        if isinstance(flight, _UnifiedFlight):
            # A step dispatched now runs after the one in flight; its tokens land after both.
            rest = flight.started_at + seconds.get(flight.queued, queued) - now
            return max(0.0, rest) + run * queued
        return seconds.get(False, queued) + (run - 1) * queued

    def _serve_rows(
        self, scheduled: ScheduledStep, sampling_stages: SamplingStages = ARGMAX_ONLY
    ) -> ServeRows:
        return ServeRows.pack(
            scheduled.chunks,
            scheduled.adapter_slots,
            self.config,
            self.model_config.vocab_size,
            num_rows=self.runtime_config.serve_rows,
            sampling_stages=sampling_stages,
        )

    def _dispatch_unified(
        self,
        train: list,
        rows: dict[str, int],
        scheduled: ScheduledStep | None,
        serve: ServeRows,
        active: Sequence[JobRun],
    ) -> _UnifiedFlight:
        """Dispatches a unified step over ``train`` [(run, example)] and the ``serve``
        rows of ``scheduled``, their pending tokens and the slots to halt taken from the
        step in flight."""
        flight = self._in_flight
        pending = None if scheduled is None else self._pending(scheduled)
        sampled = () if scheduled is None else self._begin(scheduled)
        planned = self._plan(train, rows, active)
        out = self._run_unified(
            train,
            serve,
            accumulate=[p.run.slot for p in planned if not p.update],
            previous=flight,
            pending=pending,
        )
        stages = serve.sampling.stages
        return _UnifiedFlight(scheduled, out.next_tokens, sampled, out, planned, stages)

    def _plan(self, train: list, rows: dict[str, int], active: Sequence[JobRun]):
        """Counts a step's rows and updates for each active job, as dispatched (they are
        corrected if the step turns out non-finite for a job: ``_land_training``)."""
        examples = {run.name: [] for run in active}
        for run, example in train:
            examples[run.name].append(example)
        planned = []
        for run in active:
            before = run._rows
            run._rows += rows[run.name]
            update = 0
            if run._rows >= run.job.batch_tokens:
                run._rows, run._planned = 0, run._planned + 1
                update = run._planned
            planned.append(_Planned(run, tuple(examples[run.name]), rows[run.name], before, update))
        return tuple(planned)

    def _run_unified(
        self,
        train: list,
        serve: ServeRows,
        *,
        accumulate: Sequence[int] = (),
        previous: _InFlight | _UnifiedFlight | None = None,
        pending: PendingTokens | None = None,
    ) -> StepOutput:
        """Dispatches a unified step over ``train`` [(run, example)] and the serving rows:
        slots in ``accumulate`` only accumulate; paused jobs' slots, and those the
        ``previous`` unified step found non-finite, are halted; ``pending`` tokens come
        from ``previous``."""
        config = self.runtime_config
        batch = UnifiedBatch.pack_cached(
            [example.sequence(run.slot) for run, example in train],
            serve,
            num_train_rows=config.train_rows,
            max_train_seqs=config.max_train_seqs,
            num_slots=self.registry.num_slots,
            accumulate=accumulate,
            halt=[run.slot for run in self.jobs.values() if run.paused],
            placement=self._placement,
        )
        if isinstance(previous, _UnifiedFlight):
            batch = batch.halting(previous.out.nonfinite)
        if pending is not None:
            batch = batch.with_pending(previous.next_tokens, pending)
        state, self._cache, out = self._step(
            self._frozen_leaves.leaves, self._train_leaves.leaves, batch, self._cache
        )
        self._train_leaves = Leaves(self._train_leaves.treedef, state)
        return out

    def _land(self, flight: _InFlight | _UnifiedFlight) -> dict[str, int]:
        if not isinstance(flight, _UnifiedFlight):
            return super()._land(flight)
        out = flight.out
        next_tokens, loss, num_tokens, updated, nonfinite = jax.device_get(
            (out.next_tokens, out.loss, out.num_tokens, out.updated, out.nonfinite)
        )
        if flight.timed:
            seconds = self.clock() - flight.started_at
            previous = self._unified_seconds.get(flight.queued)
            average = seconds if previous is None else 0.7 * previous + 0.3 * seconds
            self._unified_seconds[flight.queued] = average
        self._land_training(flight.planned, loss, num_tokens, updated, nonfinite)
        if flight.scheduled is None:
            return {}
        return self._commit(flight.scheduled, next_tokens, flight.sampled)

    def _land_training(self, planned, loss, num_tokens, updated, nonfinite) -> None:
        """Accounts a landed unified step's losses and updates to its jobs."""
        for p in planned:
            run, slot = p.run, p.run.slot
            if run.paused:  # by a step before, after which this one halted its slot
                run.give_back(p.examples)
            elif nonfinite[slot]:  # its micro-batch was dropped
                # What the optimizer holds: the update's earlier micro-batches, or none
                # if it applied them; the steps dispatched after this one halt the slot.
                run._rows = 0 if updated[slot] else p.rows_before
                self._fail(run, float(loss[slot]), bool(updated[slot]))
                run._planned = run.updates
            else:
                self._account(run, p.rows, float(loss[slot]), int(num_tokens[slot]), p.update)
                self._landed_rows[run.name] = self._landed_rows.get(run.name, 0) + p.rows

    def _time(self, variant: tuple, seconds: float, jobs_active: bool) -> None:
        """Fine-tuning's share of step time, for the policy. ``variant`` is (kind, its
        static parts); the unified steps' times are taken as they land (``_land``), but
        for a variant's first, which compiles it."""
        kind = variant[0]
        self._ran.add(variant)
        if jobs_active:
            self._active_seconds += seconds
            self._train_seconds += seconds if kind != "serve" else 0.0

    def _on_finish(self, request: _Request) -> None:
        if request.finish_reason in ("stop", "length") and request.token_times:
            adapter = request.seq.adapter or BASE
            self.metrics.request(RequestRecord.of(adapter, request.arrival, request.token_times))

    def _pack_training(self, active: list[JobRun], tokens: int):
        """Round-robin whole examples of the active jobs into ``tokens`` rows, starting
        one job further on each step, so that jobs whose examples fill the rows alone take
        turns.

        Returns:
          [(run, example)] in packing order, and each job's rows.
        """
        first = self._packings % len(active)
        self._packings += 1
        active = active[first:] + active[:first]
        packed, rows = [], {run.name: 0 for run in active}
        room, progressing = tokens, True
        while progressing and len(packed) < self.runtime_config.max_train_seqs:
            progressing = False
            for run in active:
                if len(packed) == self.runtime_config.max_train_seqs:
                    break
                example = run.take(room)
                if example is not None:
                    packed.append((run, example))
                    rows[run.name] += len(example.tokens)
                    room -= len(example.tokens)
                    progressing = True
        return packed, rows

    def _account(self, run: JobRun, rows: int, loss: float, tokens: int, update: int) -> None:
        """A landed micro-batch of ``run``: ``update`` is the update it completes, or 0."""
        run.trained_tokens += rows
        run._loss_sum += loss * tokens
        run._loss_tokens += tokens
        if update:
            self._finish_update(run)

    def _finish_update(self, run: JobRun) -> None:
        run.updates += 1
        mean = run._loss_sum / max(run._loss_tokens, 1)
        run._loss_sum, run._loss_tokens = 0.0, 0
        run.train_loss.append((run.updates, mean))
        self.metrics.train(run.name, run.updates, mean)
        if run.progress is not None:
            run.progress.update()
            run.progress.set_postfix(loss=f"{mean:.3f}")
        if run.evaluates_at(run.updates):
            self._evaluate(run)
        if run.done and run.progress is not None:
            run.progress.close()

    def _fail(self, run: JobRun, loss: float, updated: bool) -> None:
        """Pauses ``run`` after a step whose micro-batch for it was non-finite: the
        optimizer dropped it, and still applied the update's earlier micro-batches if this
        step was to complete the update (``updated``)."""
        if updated:
            self._finish_update(run)
            failing = f"the last micro-batch of update {run.updates} (applied without it)"
        else:
            failing = f"update {run.updates + 1}"
        cause = (
            f"the training loss was {loss}"
            if not math.isfinite(loss)
            else "its gradient, or the update, was not finite"
        )
        eval_loss = self._eval_loss(run)
        finite = bool(jax.device_get(_slot_finite(self._state.params))[run.slot])
        kept = f"weights of update {run.updates} kept"
        if not finite:  # not through the registry or the optimizer: a corrupted table
            kept += ", and they are not finite"
        elif eval_loss is not None:
            kept += f" (held-out loss {eval_loss:.4g})"
        run.failure = f"{failing}: {cause}; paused, the {kept}"
        self.metrics.job(run.name, "paused", run.updates, run.failure, eval_loss)
        if run.progress is not None:
            run.progress.set_postfix(status="paused")

    def resume_job(
        self, name: str, *, reset_optimizer: bool = False, **hyperparams: float
    ) -> JobRun:
        """Goes on training a paused job from its kept weights, at its next example.

        Args:
          name: the job's (and its adapter's) name.
          reset_optimizer: start its slot's optimizer afresh (step count 0, moments and
            micro-batches accumulated before the failure dropped, the job's own
            hyperparameters), e.g. after a corrupted optimizer state; else it goes on
            with the state it had.
          hyperparams: new values of its slot's hyperparameters (e.g. a lower
            ``learning_rate``), applied after any reset.

        Raises:
          KeyError: no job ``name``, or an unknown hyperparameter;
          ValueError: the job is not paused, or a hyperparameter value is not a number or
            overflows. Nothing changes then.
        """
        self.land()
        run = self.jobs.get(name)
        if run is None:
            raise KeyError(f"no fine-tuning job {name!r}; jobs: {sorted(self.jobs)}")
        if not run.paused:
            raise ValueError(f"job {name!r} is {run.status}, not paused")
        self.optimizer.check_hyperparams(self._state.opt, hyperparams)
        opt = self._state.opt
        if reset_optimizer:
            opt = self.optimizer.reset_slot(opt, self._state.params, run.slot)
            if run.job.hyperparams:
                opt = self.optimizer.set_hyperparams(opt, run.slot, **run.job.hyperparams)
            run._rows, run._loss_sum, run._loss_tokens = 0, 0.0, 0
        if hyperparams:
            opt = self.optimizer.set_hyperparams(opt, run.slot, **hyperparams)
        self._state = TrainState(self._state.params, opt)
        run.failure = None
        self.metrics.job(name, "running", run.updates)
        if run.progress is not None:
            run.progress.set_postfix(status="resumed")
        return run

    def _evaluate(self, run: JobRun) -> None:
        """Records the job's held-out loss at its current update."""
        loss = self._eval_loss(run)
        if loss is not None:
            run.eval_loss.append((run.updates, loss))
            self.metrics.eval(run.name, run.updates, loss)

    def _eval_loss(self, run: JobRun) -> float | None:
        """Mean completion-token loss of the job's held-out split (forward only); None
        without one."""
        if not run.eval_examples:
            return None
        config = self.runtime_config
        total, count = 0.0, 0
        for chunk in _chunks(run.eval_examples, config.train_rows, config.max_train_seqs):
            batch = UnifiedBatch.pack(
                [example.sequence(run.slot) for example in chunk],
                [],
                num_train_rows=config.train_rows,
                num_serve_rows=0,
                num_segments=config.max_train_seqs + 1,
                num_samples=0,
                num_slots=self.registry.num_slots,
                placement=self._placement,
            )
            _, (losses, counts, _, _) = self._losses(self._frozen, self._state.params, batch)
            total += float(losses[run.slot])
            count += int(counts[run.slot])
        return total / max(count, 1)


def _variant(flight: _InFlight | _UnifiedFlight) -> tuple:
    """A step's (kind, static parts): the unified step's sampler stages."""
    if isinstance(flight, _UnifiedFlight):
        return ("unified", flight.stages)
    return ("serve", None)


def _evaluates(flight: _InFlight | _UnifiedFlight) -> bool:
    """Landing ``flight`` evaluates a job, on the weights of the update it completes."""
    return isinstance(flight, _UnifiedFlight) and any(p.evaluates for p in flight.planned)


def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per-adapter token counts of both."""
    return {name: a.get(name, 0) + b.get(name, 0) for name in a.keys() | b.keys()}


def _chunks(examples: Sequence[Example], rows: int, seqs: int):
    """Consecutive groups of examples with at most ``rows`` tokens and ``seqs`` examples."""
    group, used = [], 0
    for example in examples:
        if group and (used + len(example.tokens) > rows or len(group) == seqs):
            yield group
            group, used = [], 0
        group.append(example)
        used += len(example.tokens)
    if group:
        yield group
