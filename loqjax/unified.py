"""The unified step: serving logits and per-adapter training updates in one jitted call.

A ``UnifiedBatch`` packs training sequences into the first ``num_train_rows`` rows and
serving requests into the rest; capacities are static, lengths and adapter slots are data,
so one compiled step serves every layout. The step runs the frozen base once over all
rows, differentiates only the training rows (``split_forward``), turns each adapter
slot's token losses into gradients and feeds them to a ``SlotOptimizer``:

  state, out = step(frozen, state, batch)

with ``graphdef, frozen, params = split_model(model)`` done once, ``state =
TrainState.create(params, optimizer)``, and ``step = make_unified_step(graphdef,
optimizer)``. The state is donated; the frozen base never changes.

The training loss of slot s is the mean token cross-entropy over the loss-masked rows of
its sequences; with gradient accumulation, over those of all its micro-batches since its
last update.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loqjax.lora import LoraBatch, LoraParam
from loqjax.loss import slot_sums, token_cross_entropy
from loqjax.model import CausalLM
from loqjax.optim import SlotOptimizer, SlotOptState
from loqjax.split_forward import split_logits
from pallas_kernels import token_slots


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
      tokens, positions, segment_ids: int32 [T], packed as for ``CausalLM.__call__``.
      targets: int32 [n], each training row's next token.
      loss_mask: bool [n], training rows that count in the loss.
      lora: each row's adapter slot; ``grad_rows`` = rows of training sequences.
      sample_rows: int32 [M], the last row of each serving request (spare entries repeat
        row n; their outputs are garbage).
      apply: bool [N], slots whose accumulated gradient is applied at this step; the
        others only accumulate.
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
    num_train_rows: int = dataclasses.field(metadata=dict(static=True))

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
    ) -> UnifiedBatch:
        """Packs sequences back to back from row 0 and from row ``num_train_rows``.

        Args:
          train, serve: the sequences, in packing order.
          num_train_rows, num_serve_rows: static capacities n and T - n.
          num_segments: static S of the ``LoraBatch``; at least
            ``len(train) + len(serve) + 1`` (the training padding is a segment).
          num_samples: static M, at least ``len(serve)``.
          num_slots: N of the adapter tables.
          accumulate: slots that only accumulate gradients at this step.

        Raises:
          ValueError: sequences that do not fit, or bad slots or lengths.
        """
        _check_sequences(train, serve, num_slots)
        train_lengths = np.array([len(s.tokens) for s in train], int)
        serve_lengths = np.array([len(s.tokens) for s in serve], int)
        num_train, num_serve = int(train_lengths.sum()), int(serve_lengths.sum())
        if num_train > num_train_rows or num_serve > num_serve_rows:
            raise ValueError(
                f"{num_train} training and {num_serve} serving tokens exceed capacities "
                f"{num_train_rows} and {num_serve_rows}"
            )
        if len(train) + len(serve) + 1 > num_segments:
            raise ValueError(
                f"{len(train)} training and {len(serve)} serving sequences need "
                f"{len(train) + len(serve) + 1} segments (one pads the training rows); "
                f"num_segments={num_segments}"
            )
        if len(serve) > num_samples:
            raise ValueError(f"{len(serve)} serving requests exceed num_samples={num_samples}")
        if num_samples and not num_serve_rows:
            raise ValueError("num_samples > 0 needs serving rows")

        num_rows = num_train_rows + num_serve_rows
        tokens = np.zeros(num_rows, np.int32)
        positions = np.zeros(num_rows, np.int32)
        segment_ids = np.full(num_rows, -1, np.int32)
        targets = np.zeros(num_train_rows, np.int32)
        loss_mask = np.zeros(num_train_rows, bool)
        sample_rows = np.full(num_samples, num_train_rows, np.int32)
        train_starts = np.cumsum(train_lengths) - train_lengths
        serve_starts = num_train_rows + np.cumsum(serve_lengths) - serve_lengths
        placed = zip((*train, *serve), (*train_starts, *serve_starts), strict=True)
        for k, (seq, start) in enumerate(placed):
            end = start + len(seq.tokens)
            tokens[start:end] = seq.tokens
            positions[start:end] = np.arange(len(seq.tokens))
            segment_ids[start:end] = k
        for seq, start in zip(train, train_starts, strict=True):
            # Row i predicts token i + 1; a sequence's last row predicts nothing.
            end = start + len(seq.tokens)
            mask = np.ones(end - start, bool) if seq.loss_mask is None else seq.loss_mask
            targets[start : end - 1] = seq.tokens[1:]
            loss_mask[start : end - 1] = mask[1:]
        sample_rows[: len(serve)] = serve_starts + serve_lengths - 1

        # The training padding is a base-only segment, so serving segments start at row n.
        lora = LoraBatch.pack(
            [*train_lengths, num_train_rows - num_train, *serve_lengths],
            [*(s.slot for s in train), -1, *(s.slot for s in serve)],
            num_segments,
            grad_rows=num_train,
        )
        apply = np.ones(num_slots, bool)
        apply[list(accumulate)] = False
        return cls(
            *map(jnp.asarray, (tokens, positions, segment_ids, targets, loss_mask)),
            lora,
            jnp.asarray(sample_rows),
            jnp.asarray(apply),
            num_train_rows,
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
        return cls(params, optimizer.init(params))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    """Serving results and per-slot training statistics of one step.

    Attributes:
      next_logits: float32 [M, V], next-token logits of each serving request.
      next_tokens: int32 [M], their greedy choice.
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
    *,
    all_serving_logits: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The training objective of a batch and what a step reports alongside.

    Returns:
      The sum of every slot's summed token loss (what gets differentiated: its gradient
      w.r.t. slot s's params is that of slot s's own loss) and, as auxiliaries, float32
      [N] summed token losses, int32 [N] token counts, and the serving logits (float32
      [M, V], or [T - n, V] with ``all_serving_logits``).
    """
    n = batch.num_train_rows
    num_slots = batch.apply.shape[0]
    model = nnx.merge(graphdef, params, frozen)
    train_logits, serve_logits = split_logits(
        model,
        batch.tokens,
        batch.positions,
        batch.segment_ids,
        batch.lora,
        num_train_rows=n,
        serve_rows=None if all_serving_logits else batch.sample_rows,
    )
    slots = token_slots(batch.lora.seg_ends, batch.lora.seg_slots, n, num_slots)
    losses, counts = slot_sums(
        token_cross_entropy(train_logits, batch.targets), batch.loss_mask, slots, num_slots
    )
    return jnp.sum(losses), (losses, counts, serve_logits)


def unified_step(
    graphdef: nnx.GraphDef,
    optimizer: SlotOptimizer,
    frozen: nnx.State,
    state: TrainState,
    batch: UnifiedBatch,
    *,
    all_serving_logits: bool = False,
) -> tuple[TrainState, StepOutput]:
    """One step: serve ``batch``'s requests and train its slots. Pure; see
    ``make_unified_step`` for the jitted form."""
    grad_fn = jax.grad(slot_losses, argnums=2, has_aux=True)
    grads, (losses, counts, serve_logits) = grad_fn(
        graphdef, frozen, state.params, batch, all_serving_logits=all_serving_logits
    )
    params, opt, update = optimizer.update(
        state.params, state.opt, grads, losses, counts, batch.apply
    )
    next_logits = (
        serve_logits[batch.sample_rows - batch.num_train_rows]
        if all_serving_logits
        else serve_logits
    )
    out = StepOutput(
        next_logits=next_logits,
        next_tokens=jnp.argmax(next_logits, axis=-1).astype(jnp.int32),
        serving_logits=serve_logits if all_serving_logits else None,
        loss=jnp.where(counts > 0, losses / jnp.maximum(counts, 1), 0.0),
        num_tokens=counts,
        updated=update.updated,
        nonfinite=update.nonfinite,
        grad_norm=update.grad_norm,
    )
    return TrainState(params, opt), out


def make_unified_step(
    graphdef: nnx.GraphDef, optimizer: SlotOptimizer, *, all_serving_logits: bool = False
) -> Callable[[nnx.State, TrainState, UnifiedBatch], tuple[TrainState, StepOutput]]:
    """``unified_step`` jitted as ``step(frozen, state, batch) -> (state, out)``, with
    ``state`` donated. It compiles once per batch capacity."""
    step = functools.partial(
        unified_step, graphdef, optimizer, all_serving_logits=all_serving_logits
    )
    return jax.jit(step, donate_argnums=1)
