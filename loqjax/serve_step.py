"""The serving step: one jitted forward over a packed batch of prefill chunks and decode
tokens, writing the paged KV cache and sampling each sequence's next token.

All shapes are static (``EngineConfig``'s T, S, M and the pool), and lengths, positions,
pages, adapters and sampling parameters travel as metadata, so the step compiles once per
set of sampler stages the requests need (``SamplingStages``: greedy alone, or with the
repetition penalty, top-k/top-p, a draw).
Sequence s of a step is segment s of the packed tokens, LoRA segment s and row s of the
page tables, the logit rows and the sampling parameters.
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
from jax.tree_util import PyTreeDef

from loqjax import sharding, transfer
from loqjax.kv_cache import KVCache, PageBatch, page_slots
from loqjax.leaves import with_leaves
from loqjax.lora import LoraBatch
from loqjax.sampling import ARGMAX_ONLY, SamplingBatch, SamplingStages, sample
from loqjax.scheduler import Chunk, EngineConfig


class ServeRows(NamedTuple):
    """One step's scheduled chunks packed back to back from row 0, on the host.

    Attributes:
      tokens, positions, segment_ids: int32 [T]; positions are positions in the cache,
        segment id s = the step's sequence row s, -1 for padding.
      cache_slots: int32 [T], flat cache slot of each row; padding gets the out-of-range
        ``num_pages * page_size``, so its writes are dropped.
      page_tables: int32 [S, M].
      logit_rows: int32 [S], each sequence's last row.
      lengths, adapter_slots: per chunk, its rows and adapter slot (-1: the base model).
      sampling: each sequence's sampling parameters (numpy arrays).
    """

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    cache_slots: np.ndarray
    page_tables: np.ndarray
    logit_rows: np.ndarray
    lengths: list[int]
    adapter_slots: list[int]
    sampling: SamplingBatch

    @classmethod
    def pack(
        cls,
        chunks: Sequence[Chunk],
        adapter_slots: Sequence[int],
        config: EngineConfig,
        vocab_size: int,
        num_rows: int | None = None,
        sampling_stages: SamplingStages = ARGMAX_ONLY,
    ) -> ServeRows:
        """Packs the scheduled chunks.

        Args:
          chunks: at most S, their pages already allocated.
          adapter_slots: per chunk, its adapter's slot or -1 for the base model.
          config: the static sizes.
          vocab_size: the out-of-range id that pads the repetition-penalty ids.
          num_rows: static T; default ``config.token_capacity``.
          sampling_stages: sampler stages to run besides those the chunks' requests need
            (a warm-up compiles a step variant on no chunks this way).
        """
        t, s = num_rows or config.token_capacity, config.max_seqs
        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        segment_ids = np.full(t, -1, np.int32)
        cache_slots = np.full(t, config.num_pages * config.page_size, np.int32)
        page_tables = np.zeros((s, config.pages_per_seq), np.int32)
        logit_rows = np.zeros(s, np.int32)
        offset = 0
        for row, chunk in enumerate(chunks):
            seq, rows = chunk.seq, slice(offset, offset + chunk.length)
            tokens[rows] = seq.token_ids[chunk.start : chunk.stop]
            positions[rows] = np.arange(chunk.start, chunk.stop)
            segment_ids[rows] = row
            cache_slots[rows] = page_slots(seq.pages, chunk.start, chunk.stop, config.page_size)
            page_tables[row, : len(seq.pages)] = seq.pages
            offset += chunk.length
            logit_rows[row] = offset - 1
        seqs = [chunk.seq for chunk in chunks]
        sampling = SamplingBatch.pack_host(
            [seq.params for seq in seqs],
            [seq.seed for seq in seqs],
            [seq.num_generated for seq in seqs],
            [seq.token_ids for seq in seqs],
            num_rows=s,
            seen_capacity=config.max_seq_len,
            vocab_size=vocab_size,
        )
        return cls(
            tokens,
            positions,
            segment_ids,
            cache_slots,
            page_tables,
            logit_rows,
            [chunk.length for chunk in chunks],
            list(adapter_slots),
            sampling.with_stages(sampling_stages),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ServeBatch:
    """Everything one step reads besides the weights and the KV cache.

    Attributes:
      tokens, positions, segment_ids: int32 [T], the packed chunks (see ``CausalLM``);
        positions are positions in the cache, padding has segment id -1.
      lora: each sequence's adapter slot, S segments.
      pages: the cache addressing.
      logit_rows: int32 [S], each sequence's last row, whose logits pick its next token.
      sampling: each sequence's sampling parameters.
    """

    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    lora: LoraBatch
    pages: PageBatch
    logit_rows: jax.Array
    sampling: SamplingBatch

    @classmethod
    def of(cls, rows: ServeRows, placement: jax.sharding.Sharding | None = None) -> ServeBatch:
        """The device batch of packed rows, put on ``placement`` (default the default
        device; on a mesh, ``loqjax.sharding.replicated``)."""
        lora = LoraBatch.pack_host(rows.lengths, rows.adapter_slots, len(rows.logit_rows))
        return transfer.put(
            cls(
                rows.tokens,
                rows.positions,
                rows.segment_ids,
                lora,
                PageBatch(rows.page_tables, rows.cache_slots),
                rows.logit_rows,
                rows.sampling,
            ),
            placement,
        )

    def with_pending(self, previous: jax.Array, pending: PendingTokens) -> ServeBatch:
        """This batch with the pending tokens of ``previous`` (the next tokens of the step
        in flight) in place of their placeholders, on the device."""
        tokens, sampling = pending_into(self.tokens, self.sampling, previous, pending)
        return dataclasses.replace(self, tokens=tokens, sampling=sampling)


class PendingTokens(NamedTuple):
    """The tokens of a step that an earlier step, still in flight, samples: the host packs
    a placeholder and the device puts the sampled token in (``ServeBatch.with_pending``),
    so the host can pack step N + 1 while the device runs step N.

    Attributes:
      source: int32 [S], per sequence row, the row of the earlier step's next tokens
        that is its last token; -1 if the host knows all its tokens.
      token_rows: int32 [S], the packed row of that token (its chunk's last row).
      seen_cols: int32 [S], its column in the sampling rows' ``seen`` ids; C (out of
        range) for a row without a repetition penalty, which keeps no seen ids.
    """

    source: np.ndarray
    token_rows: np.ndarray
    seen_cols: np.ndarray


def pending_into(
    tokens: jax.Array,
    sampling: SamplingBatch,
    previous: jax.Array,
    pending: PendingTokens,
    first_row: int = 0,
) -> tuple[jax.Array, SamplingBatch]:
    """Packed tokens [T] and their rows' sampling parameters with the pending tokens of
    ``previous`` (the next tokens of the step in flight) written in, on the device;
    ``pending.token_rows`` count from row ``first_row`` of ``tokens``."""
    # Stacked: one transfer, not one per array.
    stacked = np.stack([pending.source, pending.token_rows + first_row, pending.seen_cols])
    tokens, seen = _put_pending(tokens, sampling.seen, previous, stacked)
    return tokens, dataclasses.replace(sampling, seen=seen)


@jax.jit
def _put_pending(
    tokens: jax.Array, seen: jax.Array, previous: jax.Array, pending: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """tokens int32 [T] and seen int32 [S, C] with the pending tokens of ``previous``
    (int32 [S'], the earlier step's next tokens) written in; ``pending`` is int32 [3, S],
    the fields of ``PendingTokens`` stacked."""
    source, token_rows, seen_cols = pending
    known = source < 0
    token = previous[jnp.maximum(source, 0)]
    rows = jnp.where(known, tokens.shape[0], token_rows)
    tokens = tokens.at[rows].set(token, mode="drop")
    cols = jnp.where(known, seen.shape[1], seen_cols)
    seen = seen.at[jnp.arange(seen.shape[0]), cols].set(token, mode="drop")
    return tokens, seen


SERVING_COMPILER_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
"""XLA options of the serving step. On a GPU, XLA's default command-buffer schedule (LHS)
runs the step's kernels one after another; CONCURRENT orders them by their buffers alone,
so a projection's LoRA kernels run beside its base matmul. On an H200, a Llama-3-8B
decode step of 64 rows with adapters went 7.99 -> 7.05 ms (1 adapter) and 9.27 -> 8.25 ms
(64), the base's 6.25 -> 6.31 ms (RESULTS.md, run 26). Its price is temporaries that XLA
no longer packs as tightly: 63.8 -> 72.7 MiB for that step (run 27), small next to its
weights and cache. Read when a step is first built (``serve_step``'s cache); the CPU
backend accepts and ignores it. Not yet run on a mesh of several GPUs."""


@functools.cache
def serve_step(graphdef: nnx.GraphDef, states_def: PyTreeDef) -> Callable:
    """The jitted serving step of models of structure ``graphdef``:
    ``step(leaves, cache, batch) -> (next_tokens, cache)``, see ``_serve_step``, with
    ``leaves`` the leaves of the tuple of states (structure ``states_def``) that merge
    into the model.

    One function per structure (cached here), so that engines over models of one
    structure share its compilations, a step does not hash the graphdef (thousands of
    nodes for an 8B model: milliseconds of host time) on every call as a static argument
    would, and the states cross the jit boundary as a list of arrays (``loqjax.leaves``).
    """
    step = with_leaves(functools.partial(_serve_step, graphdef), (states_def, None, None))
    return jax.jit(step, donate_argnums=1, compiler_options=SERVING_COMPILER_OPTIONS)


def _serve_step(
    graphdef: nnx.GraphDef,
    states: tuple[nnx.State, ...],
    cache: KVCache,
    batch: ServeBatch,
) -> tuple[jax.Array, KVCache]:
    """Runs one step of the model ``nnx.merge(graphdef, *states)``.

    The cache is donated: its pools are updated in place.

    Returns:
      (int32 [S] next token of every sequence row, the updated cache). A row's token is
      meaningful only if its chunk reached the end of the sequence's known tokens.
    """
    model = nnx.merge(graphdef, *states)
    logits, cache = model(
        batch.tokens,
        batch.positions,
        batch.segment_ids,
        batch.lora,
        cache=cache,
        pages=batch.pages,
        logit_rows=batch.logit_rows,
    )
    # On a device mesh, the pools stay split along their heads.
    return sample(logits, batch.sampling), sharding.constrain_cache(cache, model.mesh)
