"""SMLM grouped outer product: ``out[n] = scale[n] * sum_{t in slot n} lhs[t]^T rhs[t]``.

The LoRA weight gradients are reductions over the rows of each slot:
``dA[n] = X_n^T (dY_n B_n^T) s_n`` (``lhs = X``, ``rhs = mid``) and
``dB[n] = s_n (X_n A_n)^T dY_n`` (``lhs = H``, ``rhs = dY``). The rows of each
slot are cut into chunks (``plan_slot_chunks``); the grid is (chunk, lhs
column block, rhs column block), so one adapter with many rows still fills the
GPU. Each program writes a float32 partial; a second kernel sums each slot's
partials in a fixed order, so results are deterministic (no atomics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.platform import (
    axis_mask,
    block_mask,
    block_reach,
    covering,
    default_interpret,
    load,
    tile_reach,
)
from pallas_kernels.segments import plan_row_tiles, plan_slot_chunks


def _outer_kernel(
    start_ref,
    length_ref,  # [W] int32: row tiles sorted by slot
    begin_ref,
    end_ref,  # [C] int32: each chunk's range of tiles
    lhs_ref,  # [T, P]
    rhs_ref,  # [T, Q]
    out_ref,  # [C, P, Q] float32 partials
    *,
    num_p: int,
    num_q: int,
    block_rows: int,
    block_p: int,
    block_q: int,
):
    chunk, p_block, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    p_cols = pl.ds(p_block * block_p, block_p)
    q_cols = pl.ds(q_block * block_q, block_q)
    p_mask = axis_mask(p_block, block_p, num_p)
    q_mask = axis_mask(q_block, block_q, num_q)

    def accumulate(i, acc):
        rows = pl.ds(start_ref[i], block_rows)
        row_mask = jnp.arange(block_rows) < length_ref[i]
        lhs = load(lhs_ref.at[rows, p_cols], block_mask(row_mask, p_mask))
        rhs = load(rhs_ref.at[rows, q_cols], block_mask(row_mask, q_mask))
        return acc + lax.dot_general(
            lhs,
            rhs.astype(lhs.dtype),
            (((0,), (0,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    begin, end = begin_ref[chunk], end_ref[chunk]

    @pl.when(begin < end)  # unused chunks are never read: write nothing
    def _():
        acc = lax.fori_loop(begin, end, accumulate, jnp.zeros((block_p, block_q), jnp.float32))
        plgpu.store(out_ref.at[chunk, p_cols, q_cols], acc, mask=block_mask(p_mask, q_mask))


def _sum_chunks_kernel(
    begin_ref,
    end_ref,  # [N] int32: each slot's range of chunks
    partials_ref,  # [C, P, Q] float32
    *refs,  # ([N] float32 scale,) if scaled, then out [N, P, Q]
    num_p: int,
    num_q: int,
    block_p: int,
    block_q: int,
):
    *scale_ref, out_ref = refs
    slot, p_block, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    p_cols = pl.ds(p_block * block_p, block_p)
    q_cols = pl.ds(q_block * block_q, block_q)
    mask = block_mask(axis_mask(p_block, block_p, num_p), axis_mask(q_block, block_q, num_q))

    def accumulate(c, acc):
        return acc + load(partials_ref.at[c, p_cols, q_cols], mask)

    acc = lax.fori_loop(
        begin_ref[slot], end_ref[slot], accumulate, jnp.zeros((block_p, block_q), jnp.float32)
    )
    if scale_ref:
        acc = acc * scale_ref[0][slot]
    plgpu.store(out_ref.at[slot, p_cols, q_cols], acc.astype(out_ref.dtype), mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_slots",
        "out_dtype",
        "block_rows",
        "block_p",
        "block_q",
        "tiles_per_chunk",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def segment_outer(
    lhs: jax.Array,
    rhs: jax.Array,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    scale: jax.Array | None = None,
    row_limit: jax.Array | None = None,
    *,
    num_slots: int,
    out_dtype=jnp.float32,
    block_rows: int = 64,
    block_p: int = 128,
    block_q: int = 64,
    tiles_per_chunk: int = 8,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-slot ``scale[n] * lhs_n^T @ rhs_n`` over the rows of slot ``n``.

    Args:
      lhs: ``[T, P]``; rhs: ``[T, Q]``.
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (see ``segments``).
      scale: optional ``[N]`` per-slot multiplier.
      row_limit: optional int32 scalar; rows at or past it are left out.
      num_slots: ``N``, the number of slots of the adapter table.
    Returns:
      ``[N, P, Q]`` in ``out_dtype``; zero for slots without rows.
    """
    num_rows, num_p = lhs.shape
    num_q = rhs.shape[1]
    assert rhs.shape[0] == num_rows, (lhs.shape, rhs.shape)
    tiles = plan_row_tiles(seg_ends, seg_slots, num_rows, num_slots, block_rows, row_limit)
    chunks = plan_slot_chunks(tiles, num_slots, tiles_per_chunk)
    block_p = min(block_p, max(16, pl.next_power_of_2(num_p)))
    block_q = min(block_q, max(16, pl.next_power_of_2(num_q)))
    grid_pq = (pl.cdiv(num_p, block_p), pl.cdiv(num_q, block_q))
    compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    interpret = default_interpret() if interpret is None else interpret
    num_chunks = chunks.slot.shape[0]
    rows_reach = tile_reach(num_rows, block_rows)
    p_reach, q_reach = block_reach(num_p, block_p), block_reach(num_q, block_q)
    partials_spec = covering((num_chunks, num_p, num_q), (num_chunks, p_reach, q_reach))
    extents = dict(num_p=num_p, num_q=num_q, block_p=block_p, block_q=block_q)
    partials = pl.pallas_call(
        functools.partial(_outer_kernel, block_rows=block_rows, **extents),
        grid=(num_chunks, *grid_pq),
        in_specs=[
            *[pl.no_block_spec] * 4,
            covering(lhs.shape, (rows_reach, p_reach)),
            covering(rhs.shape, (rows_reach, q_reach)),
        ],
        out_specs=partials_spec,
        out_shape=jax.ShapeDtypeStruct((num_chunks, num_p, num_q), jnp.float32),
        compiler_params=compiler_params,
        interpret=interpret,
        name="smlm_outer",
    )(chunks.tiles.start, chunks.tiles.length, chunks.begin, chunks.end, lhs, rhs)
    scale_operand = () if scale is None else (scale.astype(jnp.float32),)
    return pl.pallas_call(
        functools.partial(_sum_chunks_kernel, **extents),
        grid=(num_slots, *grid_pq),
        in_specs=[pl.no_block_spec] * 2 + [partials_spec] + [pl.no_block_spec] * len(scale_operand),
        out_specs=covering((num_slots, num_p, num_q), (num_slots, p_reach, q_reach)),
        out_shape=jax.ShapeDtypeStruct((num_slots, num_p, num_q), out_dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="smlm_sum_chunks",
    )(chunks.slot_begin, chunks.slot_end, partials, *scale_operand)
