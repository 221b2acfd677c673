"""SMLM shrink: ``out[t] = scale[s] * x[t] @ w[s]`` per row tile, with ``s`` the tile's slot.

This is LoRA's down-projection ``x @ A`` (``w = A``, ``[N, K, R]``) and, in the
backward, ``dY @ B^T`` (``w = B`` read transposed, ``[N, R, K]``). Each program
owns one row tile, reduces over ``K`` in ``block_k`` steps and writes its
``[block_rows, R]`` result; tiles without an adapter write zeros, so every
output element is written.
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
    rank_block,
    tile_reach,
)
from pallas_kernels.segments import plan_row_tiles


def _shrink_kernel(
    slot_ref,
    start_ref,
    length_ref,  # [W] int32 each
    x_ref,  # [T, K]
    w_ref,  # [N, K, R], or [N, R, K] when w_transposed
    *refs,  # ([N] float32 scale,) if scaled, then out [T, R] or [k_splits, T, R]
    num_k: int,
    rank: int,
    block_rows: int,
    block_k: int,
    block_r: int,
    blocks_per_split: int,
    w_transposed: bool,
):
    *scale_ref, out_ref = refs
    tile, split = pl.program_id(0), pl.program_id(1)
    # With K split, out_ref is [k_splits, T, R] and this program writes one partial sum.
    out_index = (split,) if len(out_ref.shape) == 3 else ()
    slot, length = slot_ref[tile], length_ref[tile]
    rows = pl.ds(start_ref[tile], block_rows)
    row_mask = jnp.arange(block_rows) < length
    r_mask = axis_mask(0, block_r, rank)

    def accumulate(i, acc):
        i = split * blocks_per_split + i
        cols = pl.ds(i * block_k, block_k)
        k_mask = axis_mask(i, block_k, num_k)
        x = load(x_ref.at[rows, cols], block_mask(row_mask, k_mask))
        if w_transposed:  # w[slot] is [R, K]: contract over its second axis.
            w = load(w_ref.at[slot, pl.ds(0, block_r), cols], block_mask(r_mask, k_mask))
            dims = (((1,), (1,)), ((), ()))
        else:
            w = load(w_ref.at[slot, cols, pl.ds(0, block_r)], block_mask(k_mask, r_mask))
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(
            x.astype(w.dtype),
            w,
            dims,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    def store(value):
        plgpu.store(
            out_ref.at[(*out_index, rows, pl.ds(0, block_r))],
            value.astype(out_ref.dtype),
            mask=block_mask(row_mask, r_mask),
        )

    zeros = jnp.zeros((block_rows, block_r), jnp.float32)

    @pl.when((length > 0) & (slot >= 0))
    def _():
        acc = lax.fori_loop(0, blocks_per_split, accumulate, zeros)
        store(acc * scale_ref[0][slot] if scale_ref else acc)

    @pl.when((length > 0) & (slot < 0))
    def _():
        store(zeros)


@functools.partial(
    jax.jit,
    static_argnames=(
        "w_transposed",
        "out_dtype",
        "block_rows",
        "block_k",
        "k_splits",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def segment_shrink(
    x: jax.Array,
    w: jax.Array,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    scale: jax.Array | None = None,
    row_limit: jax.Array | None = None,
    *,
    w_transposed: bool = False,
    out_dtype=None,
    block_rows: int = 16,
    block_k: int = 256,
    k_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 4,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-tile ``x @ w[slot]`` (times ``scale[slot]`` if given).

    Few rows (decode) make few row tiles, and one program streaming all of
    ``K`` alone is latency-bound; so ``K`` is split over ``k_splits`` programs
    per tile (default: enough for ``TARGET_PROGRAMS``), whose float32 partial
    sums are added afterwards.

    Args:
      x: ``[T, K]`` rows.
      w: ``[N, K, R]`` stacked weights (``[N, R, K]`` if ``w_transposed``).
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (see ``segments``).
      scale: optional ``[N]`` per-slot multiplier (float32).
      row_limit: optional int32 scalar; rows at or past it count as adapter-free.
    Returns:
      ``[T, R]`` in ``out_dtype`` (default ``x.dtype``); zero on adapter-free rows.
    """
    num_rows, num_k = x.shape
    rank = w.shape[1] if w_transposed else w.shape[2]
    assert w.shape[2 if w_transposed else 1] == num_k, (x.shape, w.shape)
    out_dtype = out_dtype or x.dtype
    tiles = plan_row_tiles(seg_ends, seg_slots, num_rows, w.shape[0], block_rows, row_limit)
    block_k = min(block_k, max(16, pl.next_power_of_2(num_k)))
    num_k_blocks = pl.cdiv(num_k, block_k)
    if k_splits is None:
        k_splits = _default_k_splits(pl.cdiv(num_rows, block_rows), num_k_blocks)
    assert num_k_blocks % k_splits == 0, (num_k_blocks, k_splits)
    block_r = rank_block(rank)
    kernel = functools.partial(
        _shrink_kernel,
        num_k=num_k,
        rank=rank,
        block_rows=block_rows,
        block_k=block_k,
        block_r=block_r,
        blocks_per_split=num_k_blocks // k_splits,
        w_transposed=w_transposed,
    )
    scale_operand = () if scale is None else (scale.astype(jnp.float32),)
    out_shape = (num_rows, rank) if k_splits == 1 else (k_splits, num_rows, rank)
    rows_reach, k_reach = tile_reach(num_rows, block_rows), block_reach(num_k, block_k)
    w_reach = (w.shape[0], block_r, k_reach) if w_transposed else (w.shape[0], k_reach, block_r)
    out = pl.pallas_call(
        kernel,
        grid=(tiles.slot.shape[0], k_splits),
        in_specs=[
            *[pl.no_block_spec] * len(tiles),
            covering(x.shape, (rows_reach, k_reach)),
            covering(w.shape, w_reach),
            *[pl.no_block_spec] * len(scale_operand),
        ],
        out_specs=covering(out_shape, (*out_shape[:-2], rows_reach, block_r)),
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype if k_splits == 1 else jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=default_interpret() if interpret is None else interpret,
        name="smlm_shrink",
    )(*tiles, x, w, *scale_operand)
    return out if k_splits == 1 else out.sum(axis=0).astype(out_dtype)


TARGET_PROGRAMS = 256  # about two programs per SM of an H100 (132 SMs)


def _default_k_splits(num_row_tiles: int, num_k_blocks: int) -> int:
    """The largest divisor of ``num_k_blocks`` that keeps the grid near
    ``TARGET_PROGRAMS`` programs (1 when the row tiles alone fill the GPU)."""
    wanted = max(1, TARGET_PROGRAMS // num_row_tiles)
    return max(d for d in range(1, num_k_blocks + 1) if num_k_blocks % d == 0 and d <= wanted)
