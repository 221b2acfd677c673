"""SMLM forward for small batches in two short launches per group: a split-K shrink, then
the expand that adds the splits' partial sums.

``y_g[t] = base_g[t] + scale_g[s] * (x[t] @ a_g[s]) @ b_g[s]`` for ``G`` projections
that read the same input ``x`` (q, k and v; gate and up; or one projection alone), with
``s`` the slot of row ``t``.

At decode sizes (``T`` of 16..256 rows) the work is tiny (an adapter's A and B, a few
rows) and the cost is the critical path of the longest program. A program that streams
all of ``K`` alone (a fused shrink-expand kernel, measured and deleted: 56 dependent
256-wide steps for down_proj) took 30-90 µs on an H200 (RESULTS.md, runs 5-6); so here
no program does more than ``blocks_per_split`` steps of anything:

1. ``shrink``: grid (row tile, K split). Program ``(w, j)`` reads its tile's rows of
   ``x`` in the ``block_k``-wide blocks of split ``j`` once, multiplies them by every
   projection's ``a_g[s]`` (the group shares ``x``) and writes float32 partial sums
   ``part_g [splits, T, R_g]``.
2. ``expand``: grid (row tile, column block of all ``G`` outputs end to end). Program
   ``(w, c)`` adds its tile's ``splits`` partial sums of projection ``g`` (independent
   loads, from L2, summed in a tree), rounds ``h`` to ``x.dtype`` (like the two-kernel
   path and PEFT), then writes ``base + scale * h @ b_g[s]`` over its ``sub_blocks``
   ``block_n``-wide column blocks; column block 0 of a tile also writes ``h`` for the backward.

Row tiles never straddle a segment (``plan_split_tiles``; a model plans them once per
step for all its layers and passes them in as ``tiles``) and only the first ``T`` of a
plan can hold rows, so both grids have at most ``T`` rows of programs. Tiles without
rows exit at once; tiles without an adapter skip the shrink and write ``base`` (or
zeros) and ``h = 0``, so every output element is written.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.platform import (
    DOT_ROWS,
    axis_mask,
    block_mask,
    block_reach,
    covering,
    default_interpret,
    load,
    rank_block,
    rows_dot,
    tile_reach,
)
from pallas_kernels.segments import RowTiles, plan_row_tiles

BLOCK_ROWS = 16
"""Rows per row tile (at most ``DOT_ROWS``, the dots' rows)."""


def plan_split_tiles(
    seg_ends: jax.Array, seg_slots: jax.Array, num_rows: int, num_slots: int
) -> RowTiles:
    """The row tiles ``lora_split_forward`` runs on: ``plan_row_tiles`` of ``BLOCK_ROWS``
    rows, cut to the first ``num_rows`` (the only ones that can hold rows); int32 [T]
    each."""
    tiles = plan_row_tiles(seg_ends, seg_slots, num_rows, num_slots, BLOCK_ROWS)
    return RowTiles(*(field[:num_rows] for field in tiles))


class _Projection(NamedTuple):
    """Static layout of one projection of the group in the expand grid's column axis."""

    first_block: int  # its first column block
    num_blocks: int  # its column blocks (programs per row tile)
    block_n: int
    block_r: int
    rank: int
    num_d: int
    has_base: bool


def _tile(slot_ref, start_ref, length_ref, tile):
    """(slot, length, the dot's rows, its mask of the tile's rows) of row tile ``tile``."""
    length = length_ref[tile]
    return slot_ref[tile], length, pl.ds(start_ref[tile], DOT_ROWS), jnp.arange(DOT_ROWS) < length


def _shrink_kernel(
    slot_ref,
    start_ref,
    length_ref,  # [W] int32 each
    x_ref,  # [T, K]
    *refs,  # a_g [N, K, R_g] per projection, then part_g [splits, T, R_g] f32 per projection
    num_k: int,
    ranks: tuple[int, ...],
    block_k: int,
    blocks_per_split: int,
    k_masked: bool,
):
    a_refs, part_refs = refs[: len(refs) // 2], refs[len(refs) // 2 :]
    slot, length, rows, row_mask = _tile(slot_ref, start_ref, length_ref, pl.program_id(0))
    split = pl.program_id(1)

    @pl.when((length > 0) & (slot >= 0))
    def _():
        accs = [jnp.zeros((DOT_ROWS, rank_block(rank)), jnp.float32) for rank in ranks]
        for i in range(blocks_per_split):  # unrolled: independent loads in flight
            block = split * blocks_per_split + i
            cols = pl.ds(block * block_k, block_k)
            # Blocks past K (in the last split) load nothing and add zeros.
            k_mask = (block * block_k + jnp.arange(block_k) < num_k) if k_masked else None
            x = load(x_ref.at[rows, cols], block_mask(row_mask, k_mask))
            for g, (a_ref, rank) in enumerate(zip(a_refs, ranks, strict=True)):
                r_mask = axis_mask(0, accs[g].shape[1], rank)
                a_block = a_ref.at[slot, cols, pl.ds(0, accs[g].shape[1])]
                a = load(a_block, block_mask(k_mask, r_mask))
                accs[g] = accs[g] + rows_dot(x, a)
        for acc, part_ref, rank in zip(accs, part_refs, ranks, strict=True):
            r_mask = axis_mask(0, acc.shape[1], rank)
            plgpu.store(
                part_ref.at[split, rows, pl.ds(0, acc.shape[1])],
                acc,
                mask=block_mask(row_mask, r_mask),
            )


def _expand_kernel(
    slot_ref,
    start_ref,
    length_ref,  # [W] int32 each
    *refs,  # per projection part [splits, T, R], b [N, R, D], scale [N] f32, (base [T, D],);
    # then y [T, D] per projection, then (h [T, R] per projection,) if save_h
    projections: tuple[_Projection, ...],
    sub_blocks: int,
    x_dtype: jnp.dtype,
    save_h: bool,
):
    num_inputs = sum(4 if p.has_base else 3 for p in projections)
    inputs, outputs = refs[:num_inputs], refs[num_inputs:]
    num_g = len(projections)
    slot, length, rows, row_mask = _tile(slot_ref, start_ref, length_ref, pl.program_id(0))
    col_block = pl.program_id(1)
    offset = 0
    for g, p in enumerate(projections):
        part_ref, b_ref, scale_ref, *base_ref = inputs[offset : offset + (4 if p.has_base else 3)]
        offset += len(base_ref) + 3
        block = col_block - p.first_block
        # Each program runs exactly one of these (or none, for a tile without rows).
        pl.when((length > 0) & (block >= 0) & (block < p.num_blocks))(
            functools.partial(
                _expand_projection,
                p,
                part_ref,
                b_ref,
                scale_ref,
                base_ref[0] if base_ref else None,
                outputs[g],
                outputs[num_g + g] if save_h else None,
                slot=slot,
                block=block,
                rows=rows,
                row_mask=row_mask,
                sub_blocks=sub_blocks,
                x_dtype=x_dtype,
            )
        )


def _expand_projection(
    p: _Projection,
    part_ref,
    b_ref,
    scale_ref,
    base_ref,
    y_ref,
    h_ref,
    *,
    slot,
    block,
    rows,
    row_mask,
    sub_blocks: int,
    x_dtype,
):
    """Program ``block`` of projection ``p`` on one row tile."""
    splits, num_d = part_ref.shape[0], p.num_d
    r_cols, r_mask = pl.ds(0, p.block_r), axis_mask(0, p.block_r, p.rank)
    h_mask = block_mask(row_mask, r_mask)
    first = block * sub_blocks
    end = jnp.minimum(first + sub_blocks, pl.cdiv(num_d, p.block_n))

    def out_block(j):
        cols = pl.ds(j * p.block_n, p.block_n)
        d_mask = axis_mask(j, p.block_n, num_d)
        return cols, d_mask, block_mask(row_mask, d_mask)

    def base(cols, mask):
        if base_ref is None:
            return jnp.zeros((DOT_ROWS, p.block_n), jnp.float32)
        return load(base_ref.at[rows, cols], mask).astype(jnp.float32)

    def store_h(h):
        if h_ref is None:
            return

        @pl.when(block == 0)  # one program per tile writes h, for the backward
        def _():
            plgpu.store(h_ref.at[rows, r_cols], h.astype(h_ref.dtype), mask=h_mask)

    @pl.when(slot >= 0)
    def _():
        parts = [load(part_ref.at[jnp.int32(j), rows, r_cols], h_mask) for j in range(splits)]
        while len(parts) > 1:  # a tree of sums: no chain of dependent adds
            parts = [sum(parts[i : i + 2]) for i in range(0, len(parts), 2)]
        h = parts[0].astype(x_dtype)
        store_h(h)
        scale = scale_ref[slot]

        @pl.loop(first, end)
        def _(j):
            cols, d_mask, mask = out_block(j)
            b = load(b_ref.at[slot, r_cols, cols], block_mask(r_mask, d_mask))
            y = base(cols, mask) + rows_dot(h, b) * scale
            plgpu.store(y_ref.at[rows, cols], y.astype(y_ref.dtype), mask=mask)

    @pl.when(slot < 0)
    def _():
        store_h(jnp.zeros((DOT_ROWS, p.block_r), jnp.float32))

        @pl.loop(first, end)
        def _(j):
            cols, _, mask = out_block(j)
            plgpu.store(y_ref.at[rows, cols], base(cols, mask).astype(y_ref.dtype), mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=(
        "return_h",
        "out_dtype",
        "block_k",
        "blocks_per_split",
        "block_n",
        "sub_blocks",
        "num_warps",
        "interpret",
    ),
)
def lora_split_forward(
    x: jax.Array,
    tables: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
    bases: Sequence[jax.Array | None],
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    tiles: RowTiles | None = None,
    *,
    return_h: bool = False,
    out_dtype: jnp.dtype | None = None,
    block_k: int = 512,
    blocks_per_split: int = 1,
    block_n: int = 256,
    sub_blocks: int = 2,
    num_warps: int = 4,
    interpret: bool | None = None,
):
    """``base_g + scale_g[s] * (x @ a_g[s]) @ b_g[s]`` for every projection ``g``, two
    launches.

    Args:
      x: ``[T, K]`` rows shared by the group.
      tables: ``G`` tuples ``(a [N, K, R_g], b [N, R_g, D_g], scale [N])``; rank-padded
        tables of one adapter table (same ``N`` slots).
      bases: ``G`` base outputs ``[T, D_g]``, or None (zeros).
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (see ``segments``).
      tiles: ``plan_split_tiles`` of that metadata (for ``T`` rows and the tables' ``N``
        slots), or None to plan them here; or any ``RowTiles`` of ``[T]`` covering the
        rows with tiles of at most ``DOT_ROWS`` rows that never straddle a segment.
      return_h: also return every ``h_g = x @ a_g[s]`` (zero on adapter-free rows).
      out_dtype: the dtype of every ``y_g``; default ``base_g``'s, else ``x``'s.
      block_k, blocks_per_split: the shrink's ``K`` block and blocks per program.
      block_n, sub_blocks: the expand's output columns per step, and steps per program.
    Returns:
      ``(y_1, ..., y_G)``, ``y_g [T, D_g]`` in ``out_dtype``; with
      ``return_h``, ``((y_1, ..., y_G), (h_1, ..., h_G))``, ``h_g [T, R_g]`` in ``x.dtype``.
    """
    num_rows, num_k = x.shape
    tables, bases = tuple(tuple(t) for t in tables), tuple(bases)
    assert len(tables) == len(bases) >= 1, (len(tables), len(bases))
    num_slots = tables[0][0].shape[0]
    block_k = min(block_k, max(16, pl.next_power_of_2(num_k)))
    splits = pl.cdiv(pl.cdiv(num_k, block_k), blocks_per_split)
    if tiles is None:
        tiles = plan_split_tiles(seg_ends, seg_slots, num_rows, num_slots)
    num_tiles = tiles.slot.shape[0]
    assert all(field.shape == (num_tiles,) for field in tiles) and num_tiles <= num_rows, tiles
    interpret = default_interpret() if interpret is None else interpret
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)

    for (a, b, scale), base in zip(tables, bases, strict=True):
        assert a.shape[:2] == (num_slots, num_k), (x.shape, a.shape)
        assert b.shape[:2] == (num_slots, a.shape[2]) and scale.shape == (num_slots,), (b, scale)
        assert base is None or base.shape == (num_rows, b.shape[2]), (base.shape, b.shape)
    ranks = tuple(a.shape[2] for a, _, _ in tables)
    # Windows: DOT_ROWS rows from any tile start, K blocks up to the last split's end, and
    # each rank's block.
    rows_reach, k_reach = tile_reach(num_rows, DOT_ROWS), splits * blocks_per_split * block_k
    part_shapes = [(splits, num_rows, rank) for rank in ranks]
    part_specs = [
        covering(shape, (splits, rows_reach, rank_block(rank)))
        for shape, rank in zip(part_shapes, ranks, strict=True)
    ]
    parts = pl.pallas_call(
        functools.partial(
            _shrink_kernel,
            num_k=num_k,
            ranks=ranks,
            block_k=block_k,
            blocks_per_split=blocks_per_split,
            k_masked=k_reach != num_k,
        ),
        grid=(num_tiles, splits),
        in_specs=[
            *[pl.no_block_spec] * len(tiles),
            covering(x.shape, (rows_reach, k_reach)),
            *[
                covering(a.shape, (num_slots, k_reach, rank_block(a.shape[2])))
                for a, _, _ in tables
            ],
        ],
        out_specs=part_specs,
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32) for shape in part_shapes],
        compiler_params=params,
        interpret=interpret,
        name="smlm_split_shrink",
    )(*tiles, x, *(a for a, _, _ in tables))

    projections, operands, in_specs, y_shapes, h_shapes, y_specs, h_specs = ([] for _ in range(7))
    num_blocks = 0
    for (_, b, scale), base, part, part_spec in zip(tables, bases, parts, part_specs, strict=True):
        rank, num_d = b.shape[1:]
        bn = min(block_n, max(16, pl.next_power_of_2(num_d)))
        blocks = pl.cdiv(pl.cdiv(num_d, bn), sub_blocks)
        block_r, d_reach = rank_block(rank), block_reach(num_d, bn)
        projections.append(
            _Projection(num_blocks, blocks, bn, block_r, rank, num_d, base is not None)
        )
        num_blocks += blocks
        y_spec = covering((num_rows, num_d), (rows_reach, d_reach))
        operands += [part, b, scale.astype(jnp.float32), *([] if base is None else [base])]
        in_specs += [part_spec, covering(b.shape, (num_slots, block_r, d_reach)), pl.no_block_spec]
        in_specs += [] if base is None else [y_spec]
        y_dtype = out_dtype or (x.dtype if base is None else base.dtype)
        y_shapes.append(jax.ShapeDtypeStruct((num_rows, num_d), y_dtype))
        h_shapes.append(jax.ShapeDtypeStruct((num_rows, rank), x.dtype))
        y_specs.append(y_spec)
        h_specs.append(covering((num_rows, rank), (rows_reach, block_r)))
    out = pl.pallas_call(
        functools.partial(
            _expand_kernel,
            projections=tuple(projections),
            sub_blocks=sub_blocks,
            x_dtype=x.dtype,
            save_h=return_h,
        ),
        grid=(num_tiles, num_blocks),
        in_specs=[*[pl.no_block_spec] * len(tiles), *in_specs],
        out_specs=y_specs + (h_specs if return_h else []),
        out_shape=y_shapes + (h_shapes if return_h else []),
        compiler_params=params,
        interpret=interpret,
        name="smlm_split_expand",
    )(*tiles, *operands)
    ys = tuple(out[: len(tables)])
    return (ys, tuple(out[len(tables) :])) if return_h else ys
