"""Fused SMLM forward for small batches: shrink and expand of a group of projections in one launch.

``y_g[t] = base_g[t] + scale_g[s] * (x[t] @ a_g[s]) @ b_g[s]`` for ``G``
projections that read the same input ``x`` (q, k and v; gate and up; or one
projection alone), with ``s`` the slot of row ``t``.

In decode (``T`` of 16..64 rows) the separate shrink and expand kernels move
little data and cost mostly their fixed latency, paid twice per projection.
Here a single ``pallas_call`` does the whole group. The grid is (row tile,
column block), the column blocks of all ``G`` outputs laid end to end: program
``(w, c)`` serves one projection ``g``; it computes its tile's
``h = x @ a_g[s]`` (``[rows, R]``, float32 over ``K``, rounded to ``x.dtype``
like the two-kernel path and PEFT), then loops over the ``block_n``-wide
sub-blocks of its ``block_cols`` output columns, writing
``base + scale * h @ b_g[s]``. No program waits for another, and ``h`` never
goes through memory before the expand.

The price is the recomputed shrink: every column block of a tile reads the
tile's ``x`` rows and the whole ``a_g[s]`` (``K x R``) again, from L2 after the
first touch. Per tile that is ``blocks * K * R`` elements of A against
``(K + D) * R`` for reading A and B once; with one-row tiles (64 adapters, one
row each) and 128-column blocks that is ~470 MB of L2 reads for one gate
projection (r = 8). So by default a projection gets at most
``MAX_A_REREAD * (K + D) / K`` column blocks: the A re-reads cost at most
``MAX_A_REREAD`` times the unavoidable weight bytes, and they come from L2
(faster than HBM). For Llama-3-8B shapes that is q/o 4 blocks of
1024 columns, k/v 2 of 512, gate/up 8 of 1792, down 2 of 2048; at T = 64 with
64 adapters, 64 one-row tiles give 128 (down) to 1024 (gate + up) programs,
1-8 per SM of an H100. Wider blocks would mean fewer, longer programs; narrower
ones more A traffic and no shorter critical path, since that path is the
shrink: each program streams all of ``K`` for its rows alone (down's
``K = 14336`` is the longest; splitting ``K`` would need a second launch or a
cross-program reduction). ``block_rows`` (default 8) bounds the ``x`` bytes of
that stream, ``rows * K``; the dots still run on 16 rows (Triton's smallest),
with the rows past the tile masked off, like the rank past ``R``.

Row tiles never straddle a segment (``plan_row_tiles``); only the first ``T``
tiles of the plan can hold rows (each holds at least one and they come first),
so the grid has at most ``T`` rows of programs whatever the segment capacity.
Tiles without rows exit at once; tiles without an adapter write ``base`` (or
zeros) and ``h = 0``, so every output element is written.

Not the small-batch forward of ``smlm`` any more: on an H200 each program's
serial walk over ``K`` made these launches 30-90 µs, and ``lora_split``'s two
short launches per group ran 2-2.5x faster per layer (RESULTS.md, runs 5-6).
Kept as the measured alternative (``bench_decode_step.py --paths fused``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.platform import (
    DOT_ROWS,
    axis_mask,
    block_mask,
    default_interpret,
    load,
    rank_block,
    rows_dot,
)
from pallas_kernels.segments import RowTiles, plan_row_tiles

MAX_A_REREAD = 2  # default column blocks keep A's L2 reads <= this x the weights' bytes


class _Projection(NamedTuple):
    """Static layout of one projection of the group in the grid's column axis."""

    first_block: int  # its first column block
    num_blocks: int  # its column blocks (programs per row tile)
    sub_blocks: int  # block_n-wide sub-blocks per column block
    block_n: int
    block_r: int
    has_base: bool


def _group_kernel(
    slot_ref,
    start_ref,
    length_ref,  # [W] int32 each
    x_ref,  # [T, K]
    *refs,  # per projection a [N, K, R], b [N, R, D], scale [N] f32, (base [T, D],);
    # then y [T, D] per projection, then (h [T, R] per projection,) if save_h
    projections: tuple[_Projection, ...],
    dot_rows: int,
    block_k: int,
    save_h: bool,
):
    num_inputs = sum(4 if p.has_base else 3 for p in projections)
    inputs, outputs = refs[:num_inputs], refs[num_inputs:]
    num_g = len(projections)
    tile, col_block = pl.program_id(0), pl.program_id(1)
    slot, length = slot_ref[tile], length_ref[tile]
    rows = pl.ds(start_ref[tile], dot_rows)
    row_mask = jnp.arange(dot_rows) < length  # the tile's rows of the dot's
    offset = 0
    for g, p in enumerate(projections):
        a_ref, b_ref, scale_ref, *base_ref = inputs[offset : offset + (4 if p.has_base else 3)]
        offset += len(base_ref) + 3
        block = col_block - p.first_block
        # Each program runs exactly one of these branches (or none, for an empty tile).
        pl.when((length > 0) & (block >= 0) & (block < p.num_blocks))(
            functools.partial(
                _project,
                p,
                x_ref,
                a_ref,
                b_ref,
                scale_ref,
                base_ref[0] if base_ref else None,
                outputs[g],
                outputs[num_g + g] if save_h else None,
                slot=slot,
                block=block,
                rows=rows,
                row_mask=row_mask,
                block_k=block_k,
            )
        )


def _project(
    p: _Projection,
    x_ref,
    a_ref,
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
    block_k: int,
):
    """One program's work for projection ``p``: the tile's shrink, then its column block."""
    num_k, rank, num_d = x_ref.shape[1], a_ref.shape[2], y_ref.shape[1]
    block_rows, block_n, block_r = row_mask.shape[0], p.block_n, p.block_r
    r_cols = pl.ds(0, block_r)
    r_mask = axis_mask(0, block_r, rank)
    first = block * p.sub_blocks
    # The last column block of a projection may have fewer sub-blocks.
    end = jnp.minimum(first + p.sub_blocks, pl.cdiv(num_d, block_n))

    def out_block(j):
        cols = pl.ds(j * block_n, block_n)
        d_mask = axis_mask(j, block_n, num_d)
        return cols, d_mask, block_mask(row_mask, d_mask)

    def base(cols, mask):
        if base_ref is None:
            return jnp.zeros((block_rows, block_n), jnp.float32)
        return load(base_ref.at[rows, cols], mask).astype(jnp.float32)

    def store_h(h):
        if h_ref is None:
            return

        @pl.when(block == 0)  # one program per tile writes h, for the backward
        def _():
            mask = block_mask(row_mask, r_mask)
            plgpu.store(h_ref.at[rows, r_cols], h.astype(h_ref.dtype), mask=mask)

    def shrink(i, acc):
        cols = pl.ds(i * block_k, block_k)
        k_mask = axis_mask(i, block_k, num_k)
        x = load(x_ref.at[rows, cols], block_mask(row_mask, k_mask))
        a = load(a_ref.at[slot, cols, r_cols], block_mask(k_mask, r_mask))
        return acc + rows_dot(x, a)

    @pl.when(slot >= 0)
    def _():
        zeros = jnp.zeros((block_rows, block_r), jnp.float32)
        h = lax.fori_loop(0, pl.cdiv(num_k, block_k), shrink, zeros).astype(x_ref.dtype)
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
        store_h(jnp.zeros((block_rows, block_r), jnp.float32))

        @pl.loop(first, end)
        def _(j):
            cols, _, mask = out_block(j)
            plgpu.store(y_ref.at[rows, cols], base(cols, mask).astype(y_ref.dtype), mask=mask)


def default_sub_blocks(num_k: int, num_d: int, block_n: int) -> int:
    """``block_n``-wide sub-blocks per column block: as narrow as allowed by
    ``MAX_A_REREAD`` (see the module docstring)."""
    num_sub = pl.cdiv(num_d, block_n)
    num_blocks = min(num_sub, max(1, MAX_A_REREAD * (num_k + num_d) // num_k))
    return pl.cdiv(num_sub, num_blocks)


@functools.partial(
    jax.jit,
    static_argnames=(
        "return_h",
        "block_rows",
        "block_k",
        "block_n",
        "block_cols",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def lora_group_forward(
    x: jax.Array,
    tables: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
    bases: Sequence[jax.Array | None],
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    *,
    return_h: bool = False,
    block_rows: int = 8,
    block_k: int = 256,
    block_n: int = 256,
    block_cols: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
):
    """``base_g + scale_g[s] * (x @ a_g[s]) @ b_g[s]`` for every projection ``g``, one launch.

    Args:
      x: ``[T, K]`` rows shared by the group.
      tables: ``G`` tuples ``(a [N, K, R_g], b [N, R_g, D_g], scale [N])``; rank-padded
        tables of one adapter table (same ``N`` slots).
      bases: ``G`` base outputs ``[T, D_g]``, or None (zeros).
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (see ``segments``).
      return_h: also return every ``h_g = x @ a_g[s]`` (zero on adapter-free rows).
      block_rows: rows per tile (at most 16, the dots' rows).
      block_k: ``K`` columns per step of the shrink.
      block_n: output columns per step of the expand.
      block_cols: output columns per program, for every projection (rounded up
        to a multiple of ``block_n``); default ``default_sub_blocks`` per projection.
    Returns:
      ``(y_1, ..., y_G)``, ``y_g [T, D_g]`` in ``base_g``'s dtype (else ``x``'s); with
      ``return_h``, ``((y_1, ..., y_G), (h_1, ..., h_G))``, ``h_g [T, R_g]`` in ``x.dtype``.
    """
    num_rows, num_k = x.shape
    tables, bases = tuple(tuple(t) for t in tables), tuple(bases)
    assert len(tables) == len(bases) >= 1, (len(tables), len(bases))
    assert 1 <= block_rows <= DOT_ROWS, block_rows
    num_slots = tables[0][0].shape[0]
    block_k = min(block_k, max(16, pl.next_power_of_2(num_k)))
    projections, operands, y_shapes, h_shapes = [], [], [], []
    num_blocks = 0
    for (a, b, scale), base in zip(tables, bases, strict=True):
        rank, num_d = a.shape[2], b.shape[2]
        assert a.shape == (num_slots, num_k, rank), (x.shape, a.shape)
        assert b.shape == (num_slots, rank, num_d) and scale.shape == (num_slots,), (b, scale)
        assert base is None or base.shape == (num_rows, num_d), (base.shape, num_rows, num_d)
        bn = min(block_n, max(16, pl.next_power_of_2(num_d)))
        if block_cols is None:
            sub_blocks = default_sub_blocks(num_k, num_d, bn)
        else:
            sub_blocks = min(pl.cdiv(block_cols, bn), pl.cdiv(num_d, bn))
        blocks = pl.cdiv(pl.cdiv(num_d, bn), sub_blocks)
        projections.append(
            _Projection(num_blocks, blocks, sub_blocks, bn, rank_block(rank), base is not None)
        )
        num_blocks += blocks
        operands += [a, b, scale.astype(jnp.float32), *([] if base is None else [base])]
        y_dtype = x.dtype if base is None else base.dtype
        y_shapes.append(jax.ShapeDtypeStruct((num_rows, num_d), y_dtype))
        h_shapes.append(jax.ShapeDtypeStruct((num_rows, rank), x.dtype))
    tiles = plan_row_tiles(seg_ends, seg_slots, num_rows, num_slots, block_rows)
    tiles = RowTiles(*(field[:num_rows] for field in tiles))  # the only tiles with rows
    kernel = functools.partial(
        _group_kernel,
        projections=tuple(projections),
        dot_rows=DOT_ROWS,
        block_k=block_k,
        save_h=return_h,
    )
    out = pl.pallas_call(
        kernel,
        grid=(tiles.slot.shape[0], num_blocks),
        out_shape=y_shapes + (h_shapes if return_h else []),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=default_interpret() if interpret is None else interpret,
        name="smlm_group_fused",
    )(*tiles, x, *operands)
    ys = tuple(out[: len(tables)])
    return (ys, tuple(out[len(tables) :])) if return_h else ys
