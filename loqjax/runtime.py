"""The unified runtime: fine-tuning jobs and serving requests in one jitted step.

Each ``Runtime.step`` asks the ``TokenPolicy`` how to split its token budget, packs one
``UnifiedBatch`` (training rows of the active jobs first, then the scheduled serving
requests) and runs the issue-5 unified step once: the serving rows yield each request's
next (greedy) token, the training rows step each job's adapter slot.

Serving design: a request's row is its whole prefix, recomputed every step (no KV cache),
so its cost in the budget is its full length. That keeps one compiled step for everything
and is cheap for short prompts on small models; serving-only traffic with long contexts
belongs on ``Engine`` and its paged KV cache.

Adapter lifecycle: ``add_job`` loads a fresh adapter into the registry under the job's
name, so requests can name it from then on and get its current weights (the tables are
shared); when the job ends it just stops training, and the registry entry stays, served
as any other adapter. Jobs and requests are added between steps (one thread).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from loqjax.adapter import LoraAdapter
from loqjax.jobs import DuplicateJobError, Example, FineTuneJob, epochs_of
from loqjax.metrics import BASE, Metrics, RequestRecord
from loqjax.model import CausalLM
from loqjax.optim import SlotOptimizer
from loqjax.registry import AdapterRegistry
from loqjax.request import InvalidPromptError, InvalidSamplingParamsError, PromptTooLongError
from loqjax.slo_scheduler import ServeDemand, SloTargets, StepCost, TokenPolicy
from loqjax.tokenization import encode_prompt
from loqjax.unified import (
    ServeSequence,
    TrainState,
    UnifiedBatch,
    make_unified_step,
    slot_losses,
    split_model,
)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Static step shapes and the scheduling policy.

    Attributes:
      train_rows, serve_rows: training and serving rows of every step (static shapes).
      max_train_seqs, max_serve_seqs: sequences per step of each kind.
      budget: tokens per step, serving and training together; default ``train_rows``,
        so fine-tuning alone fills its rows.
      min_train_share: share of the budget fine-tuning keeps under any serving load.
      slo: TTFT/TPOT targets.
      cost: optional step-cost model for the policy (see ``TokenPolicy``).
    """

    train_rows: int = 256
    serve_rows: int = 256
    max_train_seqs: int = 24
    max_serve_seqs: int = 16
    budget: int | None = None
    min_train_share: float = 0.25
    slo: SloTargets = SloTargets()
    cost: StepCost | None = None

    def policy(self) -> TokenPolicy:
        return TokenPolicy(
            budget=self.budget or self.train_rows,
            serve_capacity=self.serve_rows,
            max_serve_seqs=self.max_serve_seqs,
            train_capacity=self.train_rows,
            min_train_share=self.min_train_share,
            cost=self.cost,
        )


class ServeRequest:
    """A greedy generation request; read its fields after ``done``.

    Attributes:
      adapter: the adapter name, or None for the base model.
      prompt_ids: int token ids; output_ids: generated ids (stop id included).
      arrival: submit time; token_times: the time each output token came back.
    """

    def __init__(self, request_id, adapter, prompt_ids, max_new_tokens, stop_ids, arrival):
        self.request_id = request_id
        self.adapter = adapter
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids)
        self.arrival = arrival
        self.output_ids: list[int] = []
        self.token_times: list[float] = []
        self.done = False

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def deadline(self, slo: SloTargets) -> float:
        if not self.token_times:
            return self.arrival + slo.ttft_s
        return self.token_times[-1] + slo.tpot_s

    def add(self, token: int, now: float) -> None:
        self.output_ids.append(token)
        self.token_times.append(now)
        self.done = token in self.stop_ids or len(self.output_ids) == self.max_new_tokens

    def record(self) -> RequestRecord:
        times = [self.arrival, *self.token_times]
        return RequestRecord(
            self.adapter or BASE,
            times[1] - times[0],
            tuple(float(b - a) for a, b in itertools.pairwise(times[1:])),
        )


class JobRun:
    """A fine-tuning job in progress: its slot, splits, progress and losses.

    Attributes:
      updates / total_updates: optimizer updates done / planned.
      train_loss, eval_loss: (update, mean completion-token loss) points.
    """

    def __init__(self, job: FineTuneJob, slot: int, train: list[Example], held_out, total):
        self.job = job
        self.slot = slot
        self.train_examples = train
        self.eval_examples: list[Example] = held_out
        self.total_updates = total
        self.updates = 0
        self.train_loss: list[tuple[int, float]] = []
        self.eval_loss: list[tuple[int, float]] = []
        self._stream = epochs_of(train, job.seed)
        self._next = next(self._stream)
        self._rows = 0  # training rows since the last update
        self._loss_sum = 0.0
        self._loss_tokens = 0
        self.progress: tqdm | None = None

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def done(self) -> bool:
        return self.updates >= self.total_updates

    def take(self, room: int) -> Example | None:
        """The next training example if it fits in ``room`` rows."""
        if len(self._next.tokens) > room:
            return None
        example, self._next = self._next, next(self._stream)
        return example


class Runtime:
    """Serves requests and runs fine-tuning jobs on one model, one unified step at a time.

    Usage::

        runtime = Runtime(model, registry, tokenizer)
        runtime.add_job(FineTuneJob("upper", "upper.jsonl", steps=200))
        request = runtime.submit("upper: abc =>", adapter="upper")
        runtime.run_until_idle()
    """

    def __init__(
        self,
        model: CausalLM,
        registry: AdapterRegistry,
        tokenizer,
        config: RuntimeConfig | None = None,
        *,
        optimizer: SlotOptimizer | None = None,
        metrics: Metrics | None = None,
        progress: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """
        Args:
          model: the base with adapter tables; ``registry`` is bound to them.
          tokenizer: HF tokenizer for text prompts and datasets.
          config: step shapes and policy.
          optimizer: per-slot optimizer of every job (default ``SlotOptimizer()``: AdamW;
            a job's ``hyperparams`` set its own slot's values).
          metrics: where events go; default an in-memory ``Metrics``.
          progress: a tqdm bar per job.
          clock: seconds; injectable for tests.
        """
        self.model = model
        self.registry = registry
        self.tokenizer = tokenizer
        self.config = config or RuntimeConfig()
        self.policy = self.config.policy()
        self.optimizer = optimizer or SlotOptimizer()
        self.metrics = metrics or Metrics(self.config.slo)
        self.progress = progress
        self.clock = clock
        self.jobs: dict[str, JobRun] = {}
        self._requests: dict[int, ServeRequest] = {}
        self._ids = itertools.count()
        graphdef, self._frozen, params = split_model(model)
        self._state = TrainState.create(params, self.optimizer)
        self._step = make_unified_step(graphdef, self.optimizer)
        self._losses = jax.jit(functools.partial(slot_losses, graphdef))
        self._num_segments = self.config.max_train_seqs + self.config.max_serve_seqs + 1

    # --- adapters and jobs ----------------------------------------------------------

    def sync_model(self) -> None:
        """Writes the trained tables back into ``model`` (the step donates its buffers);
        call before using the model or registry directly."""
        nnx.update(self.model, self._state.params)

    def load_adapter(self, name: str, adapter: LoraAdapter) -> int:
        """Loads a serving adapter into a free slot; returns the slot."""
        self.sync_model()
        slot = self.registry.load(name, adapter)
        self._refresh(slot)
        return slot

    def add_job(self, job: FineTuneJob) -> JobRun:
        """Starts ``job``: loads its fresh adapter (servable from now on) and measures its
        eval loss at update 0.

        Raises:
          DuplicateJobError: a job for ``job.name`` is still running.
          DatasetError: bad records; ValueError: an example longer than ``train_rows``;
          and the registry's ``AdapterError``s (name taken, table full, bad config).
        """
        running = self.jobs.get(job.name)
        if running is not None and not running.done:
            raise DuplicateJobError(
                f"adapter {job.name!r} is already being trained ({running.updates} of "
                f"{running.total_updates} updates done); wait for that job to finish"
            )
        train, held_out = job.examples(self.tokenizer)
        longest = max(len(e.tokens) for e in train + held_out)
        if longest > self.config.train_rows:
            raise ValueError(
                f"job {job.name!r} has a {longest}-token example; train_rows is "
                f"{self.config.train_rows}"
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

    # --- serving ----------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        *,
        max_new_tokens: int = 16,
        stop_ids: Sequence[int] | None = None,
    ) -> ServeRequest:
        """Queues a greedy generation request; text prompts get the tokenizer's specials.

        Args:
          stop_ids: ids that end the request; default the tokenizer's eos id.

        Raises:
          UnknownAdapterError: ``adapter`` is not loaded.
          InvalidPromptError: empty prompt, or ids outside the vocabulary.
          PromptTooLongError: prompt plus output cannot fit the serving rows.
          InvalidSamplingParamsError: ``max_new_tokens`` is not an integer >= 1.
        """
        if adapter is not None:
            self.registry.info(adapter)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidSamplingParamsError(
                f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}"
            )
        ids = encode_prompt(prompt, self.tokenizer)
        vocab = self.model.config.vocab_size
        outside = [i for i in ids if not 0 <= i < vocab]
        if outside:
            raise InvalidPromptError(
                f"token ids {outside[:8]} are outside the vocabulary [0, {vocab})"
            )
        if len(ids) + max_new_tokens - 1 > self.config.serve_rows:
            raise PromptTooLongError(
                f"{len(ids)} prompt + {max_new_tokens} new tokens do not fit "
                f"{self.config.serve_rows} serving rows (each step recomputes the prefix)"
            )
        if stop_ids is None:
            stop_ids = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        request = ServeRequest(
            next(self._ids), adapter, ids, max_new_tokens, stop_ids, self.clock()
        )
        self._requests[request.request_id] = request
        return request

    def decode(self, request: ServeRequest) -> str:
        return self.tokenizer.decode(request.output_ids, skip_special_tokens=True)

    # --- the loop ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._requests and all(run.done for run in self.jobs.values())

    def run_until_idle(self, between_steps: Callable[[Runtime], None] | None = None) -> None:
        """Steps until every request is answered and every job done; ``between_steps``
        runs before each step (e.g. to submit traffic)."""
        while True:
            if between_steps is not None:
                between_steps(self)
            if not self.step():
                return

    def step(self) -> bool:
        """One unified step; False when there was nothing to do."""
        start = self.clock()
        active = [run for run in self.jobs.values() if not run.done]
        allocation = self.policy.allocate(
            [
                ServeDemand(r.request_id, r.length, r.deadline(self.config.slo))
                for r in self._requests.values()
            ],
            self.config.train_rows if active else 0,
            start,
        )
        served = [self._requests[i] for i in allocation.serve]
        train, rows = self._pack_training(active, allocation.train_tokens)
        if not served and not train:
            return False
        applying = [run for run in active if run._rows + rows[run.name] >= run.job.batch_tokens]
        batch = UnifiedBatch.pack(
            [example.sequence(run.slot) for run, example in train],
            [
                ServeSequence(
                    -1 if r.adapter is None else self.registry.info(r.adapter).slot,
                    np.asarray(r.prompt_ids + r.output_ids, np.int32),
                )
                for r in served
            ],
            num_train_rows=self.config.train_rows,
            num_serve_rows=self.config.serve_rows,
            num_segments=self._num_segments,
            num_samples=self.config.max_serve_seqs,
            num_slots=self.registry.num_slots,
            accumulate=[run.slot for run in active if run not in applying],
        )
        self._state, out = self._step(self._frozen, self._state, batch)
        next_tokens, loss, num_tokens = jax.device_get((out.next_tokens, out.loss, out.num_tokens))
        end = self.clock()

        generated: dict[str, int] = {}
        for request, token in zip(served, next_tokens, strict=False):
            request.add(int(token), end)
            name = request.adapter or BASE
            generated[name] = generated.get(name, 0) + 1
            if request.done:
                del self._requests[request.request_id]
                self.metrics.request(request.record())
        for run in active:
            self._account(run, rows[run.name], float(loss[run.slot]), int(num_tokens[run.slot]))
            if run in applying:
                self._finish_update(run)
        self.metrics.step(start, end, generated, {n: r for n, r in rows.items() if r})
        return True

    def _pack_training(self, active: list[JobRun], tokens: int):
        """Round-robin whole examples of the active jobs into ``tokens`` rows.

        Returns:
          [(run, example)] in packing order, and each job's rows.
        """
        packed, rows = [], {run.name: 0 for run in active}
        room, progressing = tokens, True
        while progressing and len(packed) < self.config.max_train_seqs:
            progressing = False
            for run in active:
                if len(packed) == self.config.max_train_seqs:
                    break
                example = run.take(room)
                if example is not None:
                    packed.append((run, example))
                    rows[run.name] += len(example.tokens)
                    room -= len(example.tokens)
                    progressing = True
        return packed, rows

    def _account(self, run: JobRun, rows: int, loss: float, tokens: int) -> None:
        run._rows += rows
        run._loss_sum += loss * tokens
        run._loss_tokens += tokens

    def _finish_update(self, run: JobRun) -> None:
        run.updates += 1
        mean = run._loss_sum / max(run._loss_tokens, 1)
        run._rows, run._loss_sum, run._loss_tokens = 0, 0.0, 0
        run.train_loss.append((run.updates, mean))
        self.metrics.train(run.name, run.updates, mean)
        if run.progress is not None:
            run.progress.update()
            run.progress.set_postfix(loss=f"{mean:.3f}")
        if run.done or run.updates % run.job.eval_every == 0:
            self._evaluate(run)
        if run.done and run.progress is not None:
            run.progress.close()

    def _evaluate(self, run: JobRun) -> None:
        """Mean completion-token loss of the job's held-out split (forward only)."""
        if not run.eval_examples:
            return
        total, count = 0.0, 0
        for chunk in _chunks(run.eval_examples, self.config.train_rows, self.config.max_train_seqs):
            batch = UnifiedBatch.pack(
                [example.sequence(run.slot) for example in chunk],
                [],
                num_train_rows=self.config.train_rows,
                num_serve_rows=0,
                num_segments=self._num_segments,
                num_samples=0,
                num_slots=self.registry.num_slots,
            )
            _, (losses, counts, _) = self._losses(self._frozen, self._state.params, batch)
            total += float(losses[run.slot])
            count += int(counts[run.slot])
        loss = total / max(count, 1)
        run.eval_loss.append((run.updates, loss))
        self.metrics.eval(run.name, run.updates, loss)


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
