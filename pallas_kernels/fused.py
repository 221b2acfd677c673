"""SMLM shrink and expand fused: one program per row tile does both.

``h = x @ w_in[s]`` then ``out = base + h @ w_out[s]``, with ``scale[s]``
applied to ``h`` (``scale_shrunk``) or to the expanded product. The forward is
``(x, A, B)``; the backward's row pass is ``(dY, B^T, A^T)`` giving
``mid = scale * dY B^T`` and ``dx = mid A^T``. One launch instead of two, and
``h`` never round-trips through memory before the expand; each program streams
its rows' ``K`` columns in, then their ``D`` columns out, so it pays off once
there are enough row tiles to fill the GPU (large batches). ``h`` is written
too: the backward needs it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.platform import axis_mask, block_mask, default_interpret, load, rank_block
from pallas_kernels.segments import plan_row_tiles


def _matmul(a, w, w_transposed):
    dims = (((1,), (1,)), ((), ())) if w_transposed else (((1,), (0,)), ((), ()))
    return lax.dot_general(
        a.astype(w.dtype),
        w,
        dims,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _fused_kernel(
    slot_ref,
    start_ref,
    length_ref,  # [W] int32 each
    x_ref,  # [T, K]
    w_in_ref,  # [N, K, R], or [N, R, K] when w_in_transposed
    w_out_ref,  # [N, R, D], or [N, D, R] when w_out_transposed
    scale_ref,  # [N] float32
    *refs,  # ([T, D] base,) if given, then h [T, R], out [T, D]
    block_rows: int,
    block_k: int,
    block_d: int,
    block_r: int,
    w_in_transposed: bool,
    w_out_transposed: bool,
    scale_shrunk: bool,
):
    *base_ref, h_ref, out_ref = refs
    tile = pl.program_id(0)
    slot, length = slot_ref[tile], length_ref[tile]
    num_k, rank, num_d = x_ref.shape[1], h_ref.shape[1], out_ref.shape[1]
    rows = pl.ds(start_ref[tile], block_rows)
    row_mask = jnp.arange(block_rows) < length
    r_mask = axis_mask(0, block_r, rank)
    r_cols = pl.ds(0, block_r)

    def out_block(j):
        d_mask = axis_mask(j, block_d, num_d)
        return pl.ds(j * block_d, block_d), d_mask, block_mask(row_mask, d_mask)

    def base(cols, mask):
        if not base_ref:
            return jnp.zeros((block_rows, block_d), jnp.float32)
        return load(base_ref[0].at[rows, cols], mask).astype(jnp.float32)

    def store_h(h):
        plgpu.store(
            h_ref.at[rows, r_cols], h.astype(h_ref.dtype), mask=block_mask(row_mask, r_mask)
        )

    def shrink(i, acc):
        cols = pl.ds(i * block_k, block_k)
        k_mask = axis_mask(i, block_k, num_k)
        x = load(x_ref.at[rows, cols], block_mask(row_mask, k_mask))
        if w_in_transposed:
            w = load(w_in_ref.at[slot, r_cols, cols], block_mask(r_mask, k_mask))
        else:
            w = load(w_in_ref.at[slot, cols, r_cols], block_mask(k_mask, r_mask))
        return acc + _matmul(x, w, w_in_transposed)

    @pl.when((length > 0) & (slot >= 0))
    def _():
        h = lax.fori_loop(
            0, pl.cdiv(num_k, block_k), shrink, jnp.zeros((block_rows, block_r), jnp.float32)
        )
        if scale_shrunk:
            h = h * scale_ref[slot]
        h = h.astype(h_ref.dtype)  # rounded like the unfused kernels (and PEFT)
        store_h(h)
        out_scale = 1.0 if scale_shrunk else scale_ref[slot]

        @pl.loop(0, pl.cdiv(num_d, block_d))
        def _(j):
            cols, d_mask, mask = out_block(j)
            if w_out_transposed:
                w = load(w_out_ref.at[slot, cols, r_cols], block_mask(d_mask, r_mask))
            else:
                w = load(w_out_ref.at[slot, r_cols, cols], block_mask(r_mask, d_mask))
            y = base(cols, mask) + _matmul(h, w, w_out_transposed) * out_scale
            plgpu.store(out_ref.at[rows, cols], y.astype(out_ref.dtype), mask=mask)

    @pl.when((length > 0) & (slot < 0))
    def _():
        store_h(jnp.zeros((block_rows, block_r), jnp.float32))

        @pl.loop(0, pl.cdiv(num_d, block_d))
        def _(j):
            cols, _, mask = out_block(j)
            plgpu.store(out_ref.at[rows, cols], base(cols, mask).astype(out_ref.dtype), mask=mask)


@functools.partial(
    jax.jit,
    static_argnames=(
        "w_in_transposed",
        "w_out_transposed",
        "scale_shrunk",
        "out_dtype",
        "block_rows",
        "block_k",
        "block_d",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def segment_shrink_expand(
    x: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    scale: jax.Array,
    base: jax.Array | None = None,
    row_limit: jax.Array | None = None,
    *,
    w_in_transposed: bool = False,
    w_out_transposed: bool = False,
    scale_shrunk: bool = False,
    out_dtype=None,
    block_rows: int = 16,
    block_k: int = 256,
    block_d: int = 256,
    num_warps: int = 4,
    num_stages: int = 4,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-tile ``h = x @ w_in[slot]`` and ``out = base + h @ w_out[slot]``.

    Args:
      x: ``[T, K]``.
      w_in: ``[N, K, R]`` (``[N, R, K]`` if ``w_in_transposed``).
      w_out: ``[N, R, D]`` (``[N, D, R]`` if ``w_out_transposed``).
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (see ``segments``).
      scale: ``[N]``; multiplies ``h`` if ``scale_shrunk``, else ``h @ w_out``.
      base: optional ``[T, D]``.
      row_limit: optional int32 scalar; rows at or past it count as adapter-free.
    Returns:
      ``(h [T, R] in x.dtype, out [T, D] in out_dtype)``; ``out_dtype`` defaults to
      ``base``'s dtype, else ``x``'s. Adapter-free rows get ``h = 0``, ``out = base``.
    """
    num_rows, num_k = x.shape
    rank = w_in.shape[1] if w_in_transposed else w_in.shape[2]
    num_d = w_out.shape[1] if w_out_transposed else w_out.shape[2]
    assert w_in.shape[2 if w_in_transposed else 1] == num_k, (x.shape, w_in.shape)
    assert w_out.shape[2 if w_out_transposed else 1] == rank, (w_in.shape, w_out.shape)
    out_dtype = out_dtype or (x.dtype if base is None else base.dtype)
    tiles = plan_row_tiles(seg_ends, seg_slots, num_rows, w_in.shape[0], block_rows, row_limit)
    kernel = functools.partial(
        _fused_kernel,
        block_rows=block_rows,
        block_k=min(block_k, max(16, pl.next_power_of_2(num_k))),
        block_d=min(block_d, max(16, pl.next_power_of_2(num_d))),
        block_r=rank_block(rank),
        w_in_transposed=w_in_transposed,
        w_out_transposed=w_out_transposed,
        scale_shrunk=scale_shrunk,
    )
    base_operand = () if base is None else (base,)
    return pl.pallas_call(
        kernel,
        grid=(tiles.slot.shape[0],),
        out_shape=(
            jax.ShapeDtypeStruct((num_rows, rank), x.dtype),
            jax.ShapeDtypeStruct((num_rows, num_d), out_dtype),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=default_interpret() if interpret is None else interpret,
        name="smlm_shrink_expand",
    )(*tiles, x, w_in, w_out, scale.astype(jnp.float32), *base_operand)
