"""Segment metadata for segmented multi-LoRA matmul (SMLM).

A packed batch of ``T`` token rows is split into ``S`` contiguous *segments*,
each served by one adapter *slot* of a stacked adapter table (or by none).
Segments are described by two int32 arrays:

* ``seg_ends [S]``: exclusive end row of each segment, non-decreasing. Segment
  ``i`` covers rows ``[seg_ends[i-1], seg_ends[i])`` (``seg_ends[-1] := 0``).
  Pad to a static ``S`` by repeating the last end (zero-length segments).
* ``seg_slots [S]``: adapter slot of each segment; ``-1`` means no adapter.

Rows past ``seg_ends[S-1]`` (padding at the end of a fixed-capacity batch) have
no adapter. Out-of-range ends are clipped to ``[0, T]`` and made non-decreasing,
and slots outside ``[0, num_slots)`` are treated as ``-1``, so malformed
metadata can never make a kernel read or write out of bounds; validating it is
the caller's job (the adapter table does so on the host).

Kernels do not walk segments themselves. They iterate over *row tiles*: pieces
of at most ``block_rows`` rows that never straddle a segment, planned here with
plain ``jnp`` inside the caller's jit, so one compiled kernel serves every
segment layout of a given capacity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class RowTiles(NamedTuple):
    """Row tiles covering rows ``[0, T)`` exactly once; all int32 ``[W]``.

    Tile ``w`` covers rows ``[start[w], start[w] + length[w])`` (``length <=
    block_rows``) with adapter ``slot[w]`` (``-1``: none). Tiles past the real
    count have ``length == 0``.
    """

    slot: jax.Array
    start: jax.Array
    length: jax.Array


class SlotChunks(NamedTuple):
    """Row tiles sorted by slot and cut into chunks, each of one slot only.

    Kernels that reduce over the rows of each slot (the weight gradients) give
    every chunk its own program, so a slot with many rows still spreads over the
    whole GPU, and sum the per-chunk partial results afterwards, in a fixed order.

    * ``tiles``: the row tiles sorted by slot (adapter-free tiles last).
    * ``slot [C]``: the slot of each chunk (``num_slots`` for unused chunks).
    * ``begin [C]``, ``end [C]``: each chunk's range of sorted tiles.
    * ``slot_begin [N]``, ``slot_end [N]``: each slot's range of chunks.
    """

    tiles: RowTiles
    slot: jax.Array
    begin: jax.Array
    end: jax.Array
    slot_begin: jax.Array
    slot_end: jax.Array


def normalize_segments(
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    num_rows: int,
    num_slots: int,
    row_limit: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(starts, ends, slots)``, int32 ``[S + 1]``, tiling ``[0, T)``.

    The extra last segment is the adapter-free tail ``[seg_ends[-1], T)``. Rows
    at or past ``row_limit`` (if given) are moved into that tail, which is how
    the backward restricts gradients to the leading training rows.
    """
    ends = jnp.clip(jax.lax.cummax(seg_ends.astype(jnp.int32)), 0, num_rows)
    if row_limit is not None:
        ends = jnp.minimum(ends, jnp.asarray(row_limit, jnp.int32))
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    slots = seg_slots.astype(jnp.int32)
    slots = jnp.where((slots >= 0) & (slots < num_slots), slots, -1)
    slots = jnp.concatenate([slots, jnp.full((1,), -1, jnp.int32)])
    return starts, ends, slots


def max_row_tiles(num_rows: int, num_segments: int, block_rows: int) -> int:
    """Static bound on the number of row tiles: each segment adds one partial."""
    return pl.cdiv(num_rows, block_rows) + num_segments + 1


def plan_row_tiles(
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    num_rows: int,
    num_slots: int,
    block_rows: int,
    row_limit: jax.Array | int | None = None,
) -> RowTiles:
    """Splits every segment into tiles of at most ``block_rows`` rows."""
    starts, ends, slots = normalize_segments(seg_ends, seg_slots, num_rows, num_slots, row_limit)
    tiles_per_segment = pl.cdiv(ends - starts, block_rows)
    last_tile = jnp.cumsum(tiles_per_segment)  # inclusive
    num_tiles = max_row_tiles(num_rows, seg_ends.shape[0], block_rows)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    segment = _searchsorted(last_tile, tile, side="right")
    segment = jnp.minimum(segment, starts.shape[0] - 1).astype(jnp.int32)
    first_tile = last_tile[segment] - tiles_per_segment[segment]
    start = starts[segment] + (tile - first_tile) * block_rows
    length = jnp.clip(ends[segment] - start, 0, block_rows)
    length = jnp.where(tile < last_tile[-1], length, 0)
    start = jnp.where(length > 0, start, 0)
    return RowTiles(slots[segment], start.astype(jnp.int32), length.astype(jnp.int32))


def max_slot_chunks(num_tiles: int, num_slots: int, tiles_per_chunk: int) -> int:
    """Static bound on the number of chunks: each slot adds one partial chunk."""
    return pl.cdiv(num_tiles, tiles_per_chunk) + num_slots


def plan_slot_chunks(tiles: RowTiles, num_slots: int, tiles_per_chunk: int) -> SlotChunks:
    """Sorts tiles by slot and cuts each slot's run into chunks of ``tiles_per_chunk``."""
    key = jnp.where((tiles.slot >= 0) & (tiles.length > 0), tiles.slot, num_slots)
    # A counting sort: tile i goes after every tile with a smaller key and after
    # the earlier tiles with its key. O(W^2) compares in one fused kernel, with
    # no sort or loop in the step (W is a few hundred).
    index = jnp.arange(key.shape[0])
    before = (key[None, :] < key[:, None]) | (
        (key[None, :] == key[:, None]) & (index[None, :] < index[:, None])
    )
    position = jnp.sum(before, axis=1)
    sorted_tiles = RowTiles(*(jnp.zeros_like(field).at[position].set(field) for field in tiles))

    slot_ids = jnp.arange(num_slots, dtype=jnp.int32)
    slot_begin = jnp.sum(key[None, :] < slot_ids[:, None], axis=1).astype(jnp.int32)
    slot_end = jnp.sum(key[None, :] <= slot_ids[:, None], axis=1).astype(jnp.int32)
    chunks_per_slot = pl.cdiv(slot_end - slot_begin, tiles_per_chunk)
    last_chunk = jnp.cumsum(chunks_per_slot)  # inclusive
    num_chunks = max_slot_chunks(key.shape[0], num_slots, tiles_per_chunk)
    chunk = jnp.arange(num_chunks, dtype=jnp.int32)
    slot = jnp.minimum(_searchsorted(last_chunk, chunk, side="right"), num_slots - 1)
    valid = chunk < last_chunk[-1]
    begin = (
        slot_begin[slot] + (chunk - (last_chunk[slot] - chunks_per_slot[slot])) * tiles_per_chunk
    )
    end = jnp.minimum(begin + tiles_per_chunk, slot_end[slot])
    return SlotChunks(
        sorted_tiles,
        jnp.where(valid, slot, num_slots).astype(jnp.int32),
        jnp.where(valid, begin, 0).astype(jnp.int32),
        jnp.where(valid, end, 0).astype(jnp.int32),
        (last_chunk - chunks_per_slot).astype(jnp.int32),
        last_chunk.astype(jnp.int32),
    )


def token_slots(
    seg_ends: jax.Array, seg_slots: jax.Array, num_rows: int, num_slots: int
) -> jax.Array:
    """The adapter slot of every row, int32 ``[T]`` (``-1``: no adapter)."""
    starts, ends, slots = normalize_segments(seg_ends, seg_slots, num_rows, num_slots)
    del starts
    row = jnp.arange(num_rows, dtype=jnp.int32)
    return slots[_searchsorted(ends, row, side="right")]


def _searchsorted(sorted_values: jax.Array, queries: jax.Array, side: str) -> jax.Array:
    """``jnp.searchsorted`` by comparing all pairs: one fused kernel on a GPU,
    where the default binary search is a device loop that syncs with the host."""
    return jnp.searchsorted(sorted_values, queries, side=side, method="compare_all").astype(
        jnp.int32
    )
