"""The unified step: serving and per-adapter training updates in one jitted call.

A ``UnifiedBatch`` packs training sequences into the first ``num_train_rows`` rows and
serving rows after them. The serving rows are either

* scheduled chunks over a paged KV cache (``UnifiedBatch.pack_cached``): the prefill
  chunks and decode tokens of the serving scheduler, whose keys and values the step writes
  to the cache and whose next tokens it samples; or
* whole sequences without a cache (``UnifiedBatch.pack``), recomputed from position 0,
  whose next tokens are greedy.

Capacities are static, lengths and adapter slots are data, so one compiled step serves
every layout. The frozen base runs once over all rows (one matmul per projection per
layer); only the training rows are differentiated. Each adapter slot's token losses turn
into gradients for a ``SlotOptimizer``:

  state, cache, out = step(frozen, state, batch, cache)

with ``graphdef, frozen, params = split_model(model)`` done once, ``state =
TrainState.create(params, optimizer)``, ``step = make_unified_step(graphdef, optimizer)``
and ``cache`` None for batches without a KV cache. The state and the cache are donated;
the frozen base never changes.

Two backward strategies, a static choice of the step:

* ``"save"`` (default): autodiff keeps the training rows' activations; the base
  projections' backward runs over the training rows only (``LoraBatch.train_rows``) and
  the serving rows are cut off before attention and the cache, so serving rows add only
  elementwise backward work. No forward is recomputed.
* ``"recompute"``: ``split_forward``: every layer saves only its training-row input and
  recomputes the training rows in the backward, so serving rows cost no backward work
  and no saved activation at all, for ~50% more forward matmuls; and the training rows'
  logits are made a chunk of rows at a time (``loqjax.loss.head_token_losses``): the
  choice when activations do not fit. Four Llama-3-8B adapters trained at once (4 x 2 x
  1024 tokens) on an H200 peaked at 21.3 GiB so, against 59.7 GiB saving, at 0.77x the
  tokens/s (benchmarks/RESULTS.md, runs 32 and 34). With ``saved_layers`` = k, the last
  k layers keep their activations instead, as under ``"save"``: the memory between the
  two, a layer at a time.

The training loss of slot s is the mean token cross-entropy over the loss-masked rows of
its sequences; with gradient accumulation, over those of all its micro-batches since its
last update.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.tree_util import PyTreeDef

from loqjax import sharding, transfer
from loqjax.kv_cache import KVCache, PageBatch
from loqjax.leaves import with_leaves
from loqjax.lora import LoraBatch, LoraParam
from loqjax.loss import slot_sums, token_cross_entropy
from loqjax.model import CausalLM
from loqjax.optim import SlotOptimizer, SlotOptState
from loqjax.sampling import SamplingBatch, sample
from loqjax.serve_step import PendingTokens, ServeRows, pending_into
from loqjax.split_forward import split_losses
from pallas_kernels import token_slots

Backward = Literal["save", "recompute"]


class TrainSequence(NamedTuple):
    """A training sequence for one adapter slot.

    Attributes:
      slot: adapter slot in [0, N).
      tokens: int [L], L >= 1, prompt and completion.
      loss_mask: bool [L]: token i's prediction (from token i - 1) counts in the loss;
        None scores every token after the first. Mask the prompt to train on
        completions only.
    """

    slot: int
    tokens: np.ndarray
    loss_mask: np.ndarray | None = None


class ServeSequence(NamedTuple):
    """A serving request: its next-token logits come from its last token.

    Attributes:
      slot: adapter slot in [0, N), or -1 for the base model alone.
      tokens: int [L], L >= 1, the whole sequence from position 0.
    """

    slot: int
    tokens: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnifiedBatch:
    """Training rows [0, n) then serving rows [n, T), with per-row and per-slot metadata.

    Attributes:
      tokens, positions, segment_ids: int32 [T], packed as for ``CausalLM.__call__``;
        with a cache, the serving rows' positions are cache positions and their segment
        ids rows of ``pages.page_tables`` (training rows keep their own ids: the two
        never attend to each other).
      targets: int32 [n], each training row's next token.
      loss_mask: bool [n], training rows that count in the loss.
      lora: each row's adapter slot; ``grad_rows`` = rows of training sequences.
      sample_rows: int32 [M], the last row of each serving request (spare entries are
        garbage rows; ignore their outputs).
      apply: bool [N], slots whose accumulated gradient is applied at this step; the
        others only accumulate.
      halt: bool [N], slots the step leaves alone whatever their rows: nothing
        accumulated or applied, their params and optimizer state bit-identical (a
        paused job's; ``halting`` adds those an earlier step found non-finite, on the
        device, so a step can be queued before that one is read back).
      pages: the serving rows' KV cache addressing (training rows write nothing), or
        None for a batch without a cache.
      sampling: the serving requests' sampling parameters, or None for greedy.
      num_train_rows: static n.
    """

    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    lora: LoraBatch
    sample_rows: jax.Array
    apply: jax.Array
    halt: jax.Array
    pages: PageBatch | None = None
    sampling: SamplingBatch | None = None
    num_train_rows: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def pack(
        cls,
        train: Sequence[TrainSequence],
        serve: Sequence[ServeSequence],
        *,
        num_train_rows: int,
        num_serve_rows: int,
        num_segments: int,
        num_samples: int,
        num_slots: int,
        accumulate: Sequence[int] = (),
        halt: Sequence[int] = (),
        placement: jax.sharding.Sharding | None = None,
    ) -> UnifiedBatch:
        """Packs sequences back to back from row 0 and from row ``num_train_rows``; the
        serving sequences are recomputed whole, without a cache.

        Args:
          train, serve: the sequences, in packing order.
          num_train_rows, num_serve_rows: static capacities n and T - n.
          num_segments: static S of the ``LoraBatch``; at least
            ``len(train) + len(serve) + 1`` (the training padding is a segment).
          num_samples: static M, at least ``len(serve)``.
          num_slots: N of the adapter tables.
          accumulate: slots that only accumulate gradients at this step.
          halt: slots the step leaves alone (``UnifiedBatch.halt``).
          placement: where the batch goes (``jax.device_put``); default the default
            device. On a device mesh, ``loqjax.sharding.replicated(mesh)``.

        Raises:
          ValueError: sequences that do not fit, or bad slots or lengths.
        """
        _check_sequences(train, serve, num_slots)
        rows = _TrainRows.pack(train, num_train_rows)
        serve_lengths = np.array([len(s.tokens) for s in serve], int)
        if serve_lengths.sum() > num_serve_rows:
            raise ValueError(
                f"{serve_lengths.sum()} serving tokens exceed the capacity {num_serve_rows}"
            )
        if len(serve) > num_samples:
            raise ValueError(f"{len(serve)} serving requests exceed num_samples={num_samples}")
        if num_samples and not num_serve_rows:
            raise ValueError("num_samples > 0 needs serving rows")

        tokens = np.zeros(num_serve_rows, np.int32)
        positions = np.zeros(num_serve_rows, np.int32)
        segment_ids = np.full(num_serve_rows, -1, np.int32)
        starts = np.cumsum(serve_lengths) - serve_lengths
        for k, (seq, start) in enumerate(zip(serve, starts, strict=True)):
            end = start + len(seq.tokens)
            tokens[start:end] = seq.tokens
            positions[start:end] = np.arange(len(seq.tokens))
            segment_ids[start:end] = len(train) + k
        sample_rows = np.full(num_samples, num_train_rows, np.int32)
        sample_rows[: len(serve)] = num_train_rows + starts + serve_lengths - 1
        return rows.batch(
            tokens,
            positions,
            segment_ids,
            serve_lengths,
            [s.slot for s in serve],
            sample_rows,
            num_segments=num_segments,
            num_slots=num_slots,
            accumulate=accumulate,
            halt=halt,
            placement=placement,
        )

    @classmethod
    def pack_cached(
        cls,
        train: Sequence[TrainSequence],
        serve: ServeRows,
        *,
        num_train_rows: int,
        max_train_seqs: int,
        num_slots: int,
        accumulate: Sequence[int] = (),
        halt: Sequence[int] = (),
        placement: jax.sharding.Sharding | None = None,
    ) -> UnifiedBatch:
        """Training sequences from row 0, then the serving scheduler's chunks over the
        paged KV cache (``ServeRows.pack``, with its own static T and S).

        Args:
          train: at most ``max_train_seqs`` training sequences, in packing order.
          serve: the packed serving rows.
          num_train_rows: static n.
          max_train_seqs: static; with S, fixes the ``LoraBatch`` at
            ``max_train_seqs + 1 + S`` segments.
          num_slots, accumulate, halt, placement: as for ``pack``.

        Raises:
          ValueError: sequences that do not fit, or bad slots or lengths.
        """
        _check_sequences(train, [], num_slots)
        if len(train) > max_train_seqs:
            raise ValueError(f"{len(train)} training sequences exceed {max_train_seqs}")
        rows = _TrainRows.pack(train, num_train_rows)
        num_seqs = serve.page_tables.shape[0]
        dropped = np.full(num_train_rows, np.iinfo(np.int32).max, np.int32)
        return rows.batch(
            serve.tokens,
            serve.positions,
            serve.segment_ids,
            serve.lengths,
            serve.adapter_slots,
            num_train_rows + serve.logit_rows,
            num_segments=max_train_seqs + 1 + num_seqs,
            num_slots=num_slots,
            accumulate=accumulate,
            halt=halt,
            pages=PageBatch(serve.page_tables, np.concatenate([dropped, serve.cache_slots])),
            sampling=serve.sampling,
            placement=placement,
        )

    def halting(self, nonfinite: jax.Array) -> UnifiedBatch:
        """This batch halting the slots of ``nonfinite`` (bool [N], an earlier step's
        ``StepOutput.nonfinite``, still on the device) too."""
        return dataclasses.replace(self, halt=self.halt | nonfinite)

    def with_pending(self, previous: jax.Array, pending: PendingTokens) -> UnifiedBatch:
        """This ``pack_cached`` batch with the pending serving tokens of ``previous`` (the
        next tokens of the step in flight) in place of their placeholders, on the device
        (as ``ServeBatch.with_pending``; ``pending`` indexes the serving rows)."""
        tokens, sampling = pending_into(
            self.tokens, self.sampling, previous, pending, first_row=self.num_train_rows
        )
        return dataclasses.replace(self, tokens=tokens, sampling=sampling)


class _TrainRows(NamedTuple):
    """The training half of a unified batch, on the host (see ``UnifiedBatch``)."""

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    slots: list[int]

    @classmethod
    def pack(cls, train: Sequence[TrainSequence], num_rows: int) -> _TrainRows:
        lengths = np.array([len(s.tokens) for s in train], int)
        if lengths.sum() > num_rows:
            raise ValueError(f"{lengths.sum()} training tokens exceed the capacity {num_rows}")
        tokens = np.zeros(num_rows, np.int32)
        positions = np.zeros(num_rows, np.int32)
        segment_ids = np.full(num_rows, -1, np.int32)
        targets = np.zeros(num_rows, np.int32)
        loss_mask = np.zeros(num_rows, bool)
        starts = np.cumsum(lengths) - lengths
        for k, (seq, start) in enumerate(zip(train, starts, strict=True)):
            end = start + len(seq.tokens)
            tokens[start:end] = seq.tokens
            positions[start:end] = np.arange(len(seq.tokens))
            segment_ids[start:end] = k
            # Row i predicts token i + 1; a sequence's last row predicts nothing.
            mask = np.ones(end - start, bool) if seq.loss_mask is None else seq.loss_mask
            targets[start : end - 1] = seq.tokens[1:]
            loss_mask[start : end - 1] = mask[1:]
        return cls(
            tokens, positions, segment_ids, targets, loss_mask, lengths, [s.slot for s in train]
        )

    def batch(
        self,
        serve_tokens,
        serve_positions,
        serve_segment_ids,
        serve_lengths,
        serve_slots,
        sample_rows,
        *,
        num_segments: int,
        num_slots: int,
        accumulate: Sequence[int],
        halt: Sequence[int],
        pages: PageBatch | None = None,
        sampling: SamplingBatch | None = None,
        placement: jax.sharding.Sharding | None = None,
    ) -> UnifiedBatch:
        """The device batch of these training rows followed by the given serving rows."""
        num_train_rows = len(self.tokens)
        num_train = int(self.lengths.sum())
        if len(self.lengths) + len(serve_lengths) + 1 > num_segments:
            raise ValueError(
                f"{len(self.lengths)} training and {len(serve_lengths)} serving sequences "
                f"need {len(self.lengths) + len(serve_lengths) + 1} segments (one pads the "
                f"training rows); num_segments={num_segments}"
            )
        # The training padding is a base-only segment, so serving segments start at row n.
        lora = LoraBatch.pack_host(
            [*self.lengths, num_train_rows - num_train, *serve_lengths],
            [*self.slots, -1, *serve_slots],
            num_segments,
            grad_rows=num_train,
        )
        apply = np.ones(num_slots, bool)
        apply[list(accumulate)] = False
        halted = np.zeros(num_slots, bool)
        halted[list(halt)] = True
        concat = np.concatenate
        return transfer.put(
            UnifiedBatch(
                concat([self.tokens, serve_tokens]),
                concat([self.positions, serve_positions]),
                concat([self.segment_ids, serve_segment_ids]),
                self.targets,
                self.loss_mask,
                lora,
                np.asarray(sample_rows, np.int32),
                apply,
                halted,
                pages,
                sampling,
                num_train_rows,
            ),
            placement,
        )


def _check_sequences(
    train: Sequence[TrainSequence], serve: Sequence[ServeSequence], num_slots: int
) -> None:
    for seq in train:
        if not 0 <= seq.slot < num_slots:
            raise ValueError(f"training slot {seq.slot} is outside [0, {num_slots})")
        if seq.loss_mask is not None and len(seq.loss_mask) != len(seq.tokens):
            raise ValueError(f"{len(seq.loss_mask)} mask entries for {len(seq.tokens)} tokens")
    for seq in serve:
        if not -1 <= seq.slot < num_slots:
            raise ValueError(f"serving slot {seq.slot} is outside [-1, {num_slots})")
    if any(len(seq.tokens) < 1 for seq in (*train, *serve)):
        raise ValueError("every sequence needs at least one token")


class TrainState(NamedTuple):
    """What a step updates: the adapter tables (``LoraParam`` state, leaves [N, ...])
    and their per-slot optimizer state."""

    params: nnx.State
    opt: SlotOptState

    @classmethod
    def create(cls, params: nnx.State, optimizer: SlotOptimizer) -> TrainState:
        """Fresh optimizer state for ``params``; placed like them when they are on a
        device mesh (``loqjax.sharding``)."""
        state = cls(params, optimizer.init(params))
        mesh = sharding.mesh_of(params)
        return state if mesh is None else sharding.shard_tree(state, mesh)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    """Serving results and per-slot training statistics of one step.

    Attributes:
      next_logits: float32 [M, V], next-token logits of each serving request.
      next_tokens: int32 [M], their next tokens: sampled with the batch's sampling
        parameters, greedy without.
      serving_logits: float32 [T - n, V], every serving row's logits, or None unless the
        step was made with ``all_serving_logits``.
      loss: float32 [N], each slot's mean token loss in this batch; 0 without tokens.
      num_tokens: int32 [N], each slot's loss tokens in this batch.
      updated, nonfinite, grad_norm: [N], see ``SlotUpdate``.
    """

    next_logits: jax.Array
    next_tokens: jax.Array
    serving_logits: jax.Array | None
    loss: jax.Array
    num_tokens: jax.Array
    updated: jax.Array
    nonfinite: jax.Array
    grad_norm: jax.Array


def split_model(model: CausalLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, frozen, params): the model's structure, everything but the adapter
    weights (base weights, adapter scales), and the ``LoraParam`` adapter tables.

    ``params`` shares the model's buffers, which the first step donates: write trained
    tables back with ``nnx.update(model, state.params)`` before using the model again.
    """
    graphdef, params, frozen = nnx.split(model, LoraParam, ...)
    return graphdef, frozen, params


def slot_losses(
    graphdef: nnx.GraphDef,
    frozen: nnx.State,
    params: nnx.State,
    batch: UnifiedBatch,
    cache: KVCache | None = None,
    *,
    backward: Backward = "save",
    saved_layers: int = 0,
    all_serving_logits: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, KVCache | None]]:
    """The training objective of a batch and what a step reports alongside.

    Args:
      cache: the KV cache of a ``pack_cached`` batch, else None.
      backward: how the training rows are differentiated (see the module docstring).
      saved_layers: with ``"recompute"``, the last layers that keep their activations.
      all_serving_logits: return every serving row's logits, not just the sampled rows'.

    Returns:
      The sum of every slot's summed token loss (what gets differentiated: its gradient
      w.r.t. slot s's params is that of slot s's own loss) and, as auxiliaries, float32
      [N] summed token losses, int32 [N] token counts, the serving logits (float32
      [M, V], or [T - n, V] with ``all_serving_logits``) and the updated cache.
    """
    if (cache is None) != (batch.pages is None):
        raise ValueError("a batch with pages needs its KV cache, and only such a batch")
    check_backward(backward, saved_layers)
    n = batch.num_train_rows
    num_slots = batch.apply.shape[0]
    model = nnx.merge(graphdef, params, frozen)
    serve_rows = None if all_serving_logits else batch.sample_rows
    if backward == "save":
        train_logits, serve_logits, cache = _saved_logits(model, batch, cache, serve_rows)
        token_losses = token_cross_entropy(train_logits, batch.targets)
    else:
        token_losses, serve_logits, cache = split_losses(
            model,
            batch.tokens,
            batch.positions,
            batch.segment_ids,
            batch.lora,
            batch.targets,
            num_train_rows=n,
            serve_rows=serve_rows,
            cache=cache,
            pages=batch.pages,
            saved_layers=saved_layers,
        )
    slots = token_slots(batch.lora.seg_ends, batch.lora.seg_slots, n, num_slots)
    losses, counts = slot_sums(token_losses, batch.loss_mask, slots, num_slots)
    return jnp.sum(losses), (losses, counts, serve_logits, cache)


def check_backward(backward: Backward, saved_layers: int) -> None:
    """Raises ValueError unless ``backward`` names a strategy and ``saved_layers`` (>= 0)
    is 0 or goes with ``"recompute"`` (``split_losses`` checks it against the layers)."""
    if backward not in ("save", "recompute"):
        raise ValueError(f"backward must be 'save' or 'recompute', got {backward!r}")
    if saved_layers < 0 or (saved_layers and backward != "recompute"):
        raise ValueError(
            f"saved_layers={saved_layers}: a count >= 0, and > 0 only with the 'recompute' backward"
        )


def _saved_logits(model: CausalLM, batch: UnifiedBatch, cache, serve_rows):
    """(training logits [n, V], serving logits without gradient, cache) of one forward
    whose backward covers the training rows only (the ``"save"`` strategy)."""
    n = batch.num_train_rows
    out = model.hidden(
        batch.tokens,
        batch.positions,
        batch.segment_ids,
        dataclasses.replace(batch.lora, train_rows=n),
        cache=cache,
        pages=batch.pages,
        num_train_rows=n,
    )
    x, cache = (out, None) if cache is None else out
    x_serve = jax.lax.stop_gradient(x[n:] if serve_rows is None else x[serve_rows])
    return model.logits(x[:n]), model.logits(x_serve), cache


def unified_step(
    graphdef: nnx.GraphDef,
    optimizer: SlotOptimizer,
    frozen: nnx.State,
    state: TrainState,
    batch: UnifiedBatch,
    cache: KVCache | None = None,
    *,
    backward: Backward = "save",
    saved_layers: int = 0,
    all_serving_logits: bool = False,
) -> tuple[TrainState, KVCache | None, StepOutput]:
    """One step: serve ``batch``'s requests and train its slots. Pure; see
    ``make_unified_step`` for the jitted form.

    On a device mesh (a graphdef of a model placed by ``loqjax.sharding.shard_model``),
    the new state and cache keep the layout of the old ones.
    """
    mesh = nnx.merge(graphdef, state.params, frozen).mesh  # static, from the graphdef
    grad_fn = jax.grad(slot_losses, argnums=2, has_aux=True)
    grads, (losses, counts, serve_logits, cache) = grad_fn(
        graphdef,
        frozen,
        state.params,
        batch,
        cache,
        backward=backward,
        saved_layers=saved_layers,
        all_serving_logits=all_serving_logits,
    )
    # A halted slot has no tokens for the optimizer and applies nothing: it keeps its bits.
    params, opt, update = optimizer.update(
        state.params,
        state.opt,
        grads,
        losses,
        jnp.where(batch.halt, 0, counts),
        batch.apply & ~batch.halt,
    )
    next_logits = (
        serve_logits[batch.sample_rows - batch.num_train_rows]
        if all_serving_logits
        else serve_logits
    )
    if batch.sampling is None:
        next_tokens = jnp.argmax(next_logits, axis=-1).astype(jnp.int32)
    else:
        next_tokens = sample(next_logits, batch.sampling)
    out = StepOutput(
        next_logits=next_logits,
        next_tokens=next_tokens,
        serving_logits=serve_logits if all_serving_logits else None,
        loss=jnp.where(counts > 0, losses / jnp.maximum(counts, 1), 0.0),
        num_tokens=counts,
        updated=update.updated,
        nonfinite=update.nonfinite,
        grad_norm=update.grad_norm,
    )
    new_state = sharding.constrain_tree(TrainState(params, opt), mesh)
    return new_state, sharding.constrain_cache(cache, mesh), out


UNIFIED_COMPILER_OPTIONS: dict[str, str] = {}
"""XLA options of the unified step, read by ``make_unified_step``: XLA's defaults, unlike
the serving step's (``loqjax.serve_step.SERVING_COMPILER_OPTIONS``), for memory: with
``{"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}`` a Llama-3-8B training step of
one adapter (2 x 1024 tokens) on an H200 made 11,570 -> 12,573 tok/s, but its temporaries
grew 11.7 -> 14.4 GiB (RESULTS.md, run 29), and they grow with the rows trained. Set this
before building a step to trade the memory for the speed."""


def make_unified_step(
    graphdef: nnx.GraphDef,
    optimizer: SlotOptimizer,
    *,
    backward: Backward = "save",
    saved_layers: int = 0,
    all_serving_logits: bool = False,
    leaves_of: tuple[PyTreeDef, PyTreeDef] | None = None,
) -> Callable[..., tuple[TrainState, KVCache | None, StepOutput]]:
    """``unified_step`` jitted as ``step(frozen, state, batch, cache=None) -> (state,
    cache, out)``, with ``state`` and ``cache`` donated. It compiles once per batch
    capacity (and once more with a cache, per set of the serving rows' sampler stages).

    With ``leaves_of = (frozen_def, state_def)``, ``frozen`` and ``state`` are passed, and
    ``state`` returned, as their leaves (lists of arrays of these structures): a step
    then spends no host time flattening and rebuilding them (``loqjax.leaves``).
    """
    check_backward(backward, saved_layers)
    step = functools.partial(
        unified_step,
        graphdef,
        optimizer,
        backward=backward,
        saved_layers=saved_layers,
        all_serving_logits=all_serving_logits,
    )
    if leaves_of is not None:
        frozen_def, state_def = leaves_of
        step = with_leaves(step, (frozen_def, state_def, None, None), {0: state_def})
    return jax.jit(step, donate_argnums=(1, 3), compiler_options=UNIFIED_COMPILER_OPTIONS)
