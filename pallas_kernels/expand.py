"""SMLM expand: ``out[t] = base[t] + scale[s] * h[t] @ w[s]`` per row tile.

This is LoRA's up-projection ``(x A) @ B`` (``w = B``, ``[N, R, D]``) and, in
the backward, ``dX = mid @ A^T`` (``w = A`` read transposed, ``[N, D, R]``).
The grid is (row tile, output column block); the rank fits in one block, so
each program does a single small matmul and streams its output block once.
Tiles without an adapter write ``base`` (or zeros), so every element is written.
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


def _expand_kernel(
    slot_ref,
    start_ref,
    length_ref,  # [W] int32 each
    h_ref,  # [T, R]
    w_ref,  # [N, R, D], or [N, D, R] when w_transposed
    scale_ref,  # [N] float32
    *refs,  # ([T, D] base,) if given, then out [T, D]
    rank: int,
    num_d: int,
    block_rows: int,
    block_d: int,
    block_r: int,
    w_transposed: bool,
):
    *base_ref, out_ref = refs
    tile, col_block = pl.program_id(0), pl.program_id(1)
    slot, length = slot_ref[tile], length_ref[tile]
    rows = pl.ds(start_ref[tile], block_rows)
    cols = pl.ds(col_block * block_d, block_d)
    row_mask = jnp.arange(block_rows) < length
    r_mask = axis_mask(0, block_r, rank)
    d_mask = axis_mask(col_block, block_d, num_d)
    out_mask = block_mask(row_mask, d_mask)

    def base():
        if not base_ref:
            return jnp.zeros((block_rows, block_d), jnp.float32)
        return load(base_ref[0].at[rows, cols], out_mask).astype(jnp.float32)

    def store(value):
        plgpu.store(out_ref.at[rows, cols], value.astype(out_ref.dtype), mask=out_mask)

    @pl.when((length > 0) & (slot >= 0))
    def _():
        h = load(h_ref.at[rows, pl.ds(0, block_r)], block_mask(row_mask, r_mask))
        if w_transposed:  # w[slot] is [D, R]: contract over its second axis.
            w = load(w_ref.at[slot, cols, pl.ds(0, block_r)], block_mask(d_mask, r_mask))
            dims = (((1,), (1,)), ((), ()))
        else:
            w = load(w_ref.at[slot, pl.ds(0, block_r), cols], block_mask(r_mask, d_mask))
            dims = (((1,), (0,)), ((), ()))
        lora = lax.dot_general(
            h.astype(w.dtype),
            w,
            dims,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        store(base() + lora * scale_ref[slot])

    @pl.when((length > 0) & (slot < 0))
    def _():
        store(base())


@functools.partial(
    jax.jit,
    static_argnames=(
        "w_transposed",
        "out_dtype",
        "block_rows",
        "block_d",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def segment_expand(
    h: jax.Array,
    w: jax.Array,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    scale: jax.Array,
    base: jax.Array | None = None,
    row_limit: jax.Array | None = None,
    *,
    w_transposed: bool = False,
    out_dtype=None,
    block_rows: int = 64,
    block_d: int = 128,
    num_warps: int = 8,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-tile ``base + scale[slot] * h @ w[slot]``.

    Args:
      h: ``[T, R]`` shrunk rows.
      w: ``[N, R, D]`` stacked weights (``[N, D, R]`` if ``w_transposed``).
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (see ``segments``).
      scale: ``[N]`` per-slot multiplier.
      base: optional ``[T, D]`` added to every row (the base layer's output).
      row_limit: optional int32 scalar; rows at or past it count as adapter-free.
    Returns:
      ``[T, D]`` in ``out_dtype`` (default: ``base``'s dtype, else ``h``'s).
    """
    num_rows, rank = h.shape
    num_d = w.shape[1] if w_transposed else w.shape[2]
    assert w.shape[2 if w_transposed else 1] == rank, (h.shape, w.shape)
    if base is not None:
        assert base.shape == (num_rows, num_d), (base.shape, num_rows, num_d)
    out_dtype = out_dtype or (h.dtype if base is None else base.dtype)
    tiles = plan_row_tiles(seg_ends, seg_slots, num_rows, w.shape[0], block_rows, row_limit)
    block_d = min(block_d, max(16, pl.next_power_of_2(num_d)))
    block_r = rank_block(rank)
    kernel = functools.partial(
        _expand_kernel,
        rank=rank,
        num_d=num_d,
        block_rows=block_rows,
        block_d=block_d,
        block_r=block_r,
        w_transposed=w_transposed,
    )
    base_operand = () if base is None else (base,)
    rows_reach, d_reach = tile_reach(num_rows, block_rows), block_reach(num_d, block_d)
    w_reach = (w.shape[0], d_reach, block_r) if w_transposed else (w.shape[0], block_r, d_reach)
    out_spec = covering((num_rows, num_d), (rows_reach, d_reach))
    return pl.pallas_call(
        kernel,
        grid=(tiles.slot.shape[0], pl.cdiv(num_d, block_d)),
        in_specs=[
            *[pl.no_block_spec] * len(tiles),
            covering(h.shape, (rows_reach, block_r)),
            covering(w.shape, w_reach),
            pl.no_block_spec,
            *[out_spec] * len(base_operand),
        ],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((num_rows, num_d), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=default_interpret() if interpret is None else interpret,
        name="smlm_expand",
    )(*tiles, h, w, scale.astype(jnp.float32), *base_operand)
