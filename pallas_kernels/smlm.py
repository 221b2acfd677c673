"""Segmented multi-LoRA matmul (SMLM) with Pallas forward and backward kernels.

``smlm(x, a, b, scale, seg_ends, seg_slots, base)`` returns, for every row ``t``
in a segment served by adapter slot ``s``, ``base[t] + scale[s] * x[t] @ a[s] @ b[s]``
(``a``/``b`` stacked and rank-padded; see ``segments`` for the metadata).
``smlm_group`` does the same for several projections of one input ``x`` (q, k
and v; gate and up), each with its own tables and base.

The forward of a batch of at most ``SMALL_BATCH_ROWS`` rows is two short launches
for the whole group (``lora_split``: a split-K shrink, an expand; ``plan_forward``
plans their row tiles once for every call on one batch); a larger batch takes two
kernels per projection, shrink (``h = x @ a[s]``, ``[T, R]``) and expand. Either
way ``h`` is saved for the backward, which is four kernels per projection with
``g = dY``:

* ``mid = scale[s] * g @ b[s]^T``   (shrink, ``b`` transposed)
* ``dx  = mid @ a[s]^T``            (expand, ``a`` transposed)
* ``da[n] = sum_{t in n} x_t^T mid_t``         (grouped outer product)
* ``db[n] = scale[n] * sum_{t in n} h_t^T g_t`` (grouped outer product)

A group's ``dx`` is the sum over its projections, accumulated in float32
through the expand's ``base`` operand (no separate additions).

Only rows ``[0, grad_rows)`` take part in the backward when ``grad_rows`` is
given (training rows come first in a unified batch): serving rows then cost no
backward work and get ``dx = 0``. ``scale`` and the metadata are constants (no
gradient); ``base`` gets ``g`` unchanged.

``smlm_group_forward`` and ``smlm_group_backward`` are the two halves of that VJP
for callers that run them on one device's shard of a mesh (``loqjax.parallel``):
their ``reduce_h`` / ``reduce_mid`` hooks reduce the ``[T, R]`` intermediates
across devices (a ``psum``) where the tables are split along ``K`` or ``D``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.expand import segment_expand
from pallas_kernels.lora_split import lora_split_forward, plan_split_tiles
from pallas_kernels.outer import segment_outer
from pallas_kernels.segments import RowTiles
from pallas_kernels.shrink import segment_shrink

SMALL_BATCH_ROWS = 256
"""Batches of at most this many rows take the small-batch forward (``lora_split``).

Below it the two-kernel forward is mostly launch latency (RESULTS.md: 10.5 µs of
kernels at T = 16 and 12.3 at T = 256, against a memory floor of 1-3 µs), which
two launches per group instead of two per projection attack. The value is not
tuned for ``lora_split``: ``benchmarks/bench_lora_decode.py`` measures both paths.
Read at trace time (``benchmarks/bench_decode_step.py`` sets it to 0 to time the
two-kernel path).
"""

Table = tuple[jax.Array, jax.Array, jax.Array]  # (a [N, K, R], b [N, R, D], scale [N])


def plan_forward(
    seg_ends: jax.Array, seg_slots: jax.Array, num_rows: int, num_slots: int
) -> RowTiles | None:
    """The small-batch forward's row tiles of a batch of ``num_rows`` rows over tables of
    ``num_slots`` slots, to pass as ``tiles`` to every ``smlm_group`` call on it; None
    for a batch above ``SMALL_BATCH_ROWS`` (its kernels plan their own).

    A model plans once per step and passes the tiles to all its layers: planned inside
    every call, the sharing is left to XLA's CSE across the layers' nested jits (which
    does share them today: RESULTS.md, runs 9-10).
    """
    if num_rows > SMALL_BATCH_ROWS:
        return None
    return plan_split_tiles(seg_ends, seg_slots, num_rows, num_slots)


def smlm(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: jax.Array,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    base: jax.Array | None = None,
    grad_rows: jax.Array | int | None = None,
    tiles: RowTiles | None = None,
    *,
    interpret: bool | None = None,
) -> jax.Array:
    """Differentiable SMLM.

    Args:
      x: ``[T, K]`` rows, bf16 or f32.
      a: ``[N, K, R]`` stacked LoRA A (``x.dtype``); b: ``[N, R, D]`` stacked LoRA B.
      scale: ``[N]`` per-slot LoRA scaling (e.g. ``alpha / r``).
      seg_ends, seg_slots: ``[S]`` int32 segment metadata.
      base: optional ``[T, D]`` base-layer output to add to.
      grad_rows: optional int32 scalar: only rows before it get gradients.
      tiles: optional ``plan_forward`` of the metadata.
      interpret: run the kernels in interpret mode (default: unless on a GPU).
    Returns:
      ``[T, D]`` in ``base``'s dtype, else ``x``'s.
    """
    (y,) = smlm_group(
        x, [(a, b, scale)], [base], seg_ends, seg_slots, grad_rows, tiles, interpret=interpret
    )
    return y


def smlm_group(
    x: jax.Array,
    tables: Sequence[Table],
    bases: Sequence[jax.Array | None],
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    grad_rows: jax.Array | int | None = None,
    tiles: RowTiles | None = None,
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, ...]:
    """Differentiable SMLM of ``G`` projections of the same rows ``x``.

    Args:
      x: ``[T, K]`` rows, bf16 or f32.
      tables: ``G`` tuples ``(a [N, K, R_g], b [N, R_g, D_g], scale [N])`` of one
        adapter table's slots (``a`` in ``x.dtype``).
      bases: ``G`` optional ``[T, D_g]`` base-layer outputs to add to.
      seg_ends, seg_slots: ``[S]`` int32 segment metadata.
      grad_rows: optional int32 scalar: only rows before it get gradients.
      tiles: optional ``plan_forward(seg_ends, seg_slots, T, N)``, planned once for all
        the calls on one batch; None plans here.
      interpret: run the kernels in interpret mode (default: unless on a GPU).
    Returns:
      ``(y_1, ..., y_G)``, ``y_g [T, D_g]`` in ``base_g``'s dtype, else ``x``'s.
    """
    tables, bases = tuple(tuple(t) for t in tables), tuple(bases)
    assert len(tables) == len(bases) >= 1, (len(tables), len(bases))
    if grad_rows is not None:
        grad_rows = jnp.asarray(grad_rows, jnp.int32)
    return _smlm_group(interpret, x, tables, bases, seg_ends, seg_slots, grad_rows, tiles)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _smlm_group(interpret, x, tables, bases, seg_ends, seg_slots, grad_rows, tiles):
    return smlm_group_forward(
        x, tables, bases, seg_ends, seg_slots, tiles=tiles, interpret=interpret
    )[0]


def smlm_group_forward(
    x: jax.Array,
    tables: Sequence[Table],
    bases: Sequence[jax.Array | None],
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    *,
    tiles: RowTiles | None = None,
    save_h: bool = False,
    reduce_h: Callable[[jax.Array], jax.Array] | None = None,
    interpret: bool | None = None,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...] | None]:
    """The forward of ``smlm_group`` without its VJP: ``(ys, hs)``, where ``hs`` are
    the projections' ``h = x @ a[s]`` ([T, R_g], in x's dtype), None unless ``save_h``
    or the two-kernel path made them. ``smlm_group_backward`` takes them back.

    Args:
      tiles: ``plan_forward`` of the metadata, or None (planned here if needed).
      reduce_h: applied to every float32 ``h`` between shrink and expand, e.g. a psum
        over a mesh axis when ``x`` and ``a`` hold one slice of ``K`` each (a
        row-parallel projection): then ``y = base + scale * round(reduce_h(h)) @ b``.
        Always takes the two-kernel path (the small-batch forward sums h's split-K
        partials inside its expand kernel).
    """
    tables, bases = tuple(tuple(t) for t in tables), tuple(bases)
    if reduce_h is None and x.shape[0] <= SMALL_BATCH_ROWS:
        return _small_batch_forward(x, tables, bases, seg_ends, seg_slots, tiles, save_h, interpret)
    ys, hs = [], []
    for (a, b, scale), base in zip(tables, bases, strict=True):
        if reduce_h is None:
            h = segment_shrink(x, a, seg_ends, seg_slots, interpret=interpret)
        else:
            h = segment_shrink(
                x, a, seg_ends, seg_slots, out_dtype=jnp.float32, interpret=interpret
            )
            h = reduce_h(h).astype(x.dtype)
        y = segment_expand(
            h,
            b,
            seg_ends,
            seg_slots,
            scale,
            base,
            out_dtype=x.dtype if base is None else base.dtype,
            interpret=interpret,
        )
        ys.append(y)
        hs.append(h)
    return tuple(ys), tuple(hs)


def _small_batch_forward(x, tables, bases, seg_ends, seg_slots, tiles, save_h, interpret):
    """``smlm_group_forward`` of a small batch: the kernels write the adapter terms alone,
    in float32, and XLA adds each to its base (rounding once, as the kernels would).

    The addition then fuses with the base matmul's own epilogue and consumers (its split-K
    sum, the q/k/v slices of a fused matmul, the residual add); a base operand of the
    kernel would make XLA write each base out first, in launches of its own (RESULTS.md,
    runs 10 and 12: 1009 -> 834 launches a decode step of the Llama-3-8B shape). At these
    sizes the float32 terms are at most a few MB.
    """
    out = lora_split_forward(
        x,
        tables,
        (None,) * len(tables),
        seg_ends,
        seg_slots,
        tiles,
        return_h=save_h,
        out_dtype=jnp.float32,
        interpret=interpret,
    )
    terms, hs = out if save_h else (out, None)
    ys = tuple(
        term.astype(x.dtype)
        if base is None
        else (base.astype(jnp.float32) + term).astype(base.dtype)
        for base, term in zip(bases, terms, strict=True)
    )
    return ys, hs


def _smlm_group_fwd(interpret, x, tables, bases, seg_ends, seg_slots, grad_rows, tiles):
    ys, hs = smlm_group_forward(
        x, tables, bases, seg_ends, seg_slots, tiles=tiles, save_h=True, interpret=interpret
    )
    # Zero-size arrays remember the bases' dtypes (or their absence) for the backward.
    base_likes = tuple(None if base is None else jnp.zeros((0,), base.dtype) for base in bases)
    return ys, (x, tables, seg_ends, seg_slots, hs, grad_rows, base_likes)


def _smlm_group_bwd(interpret, residuals, gs):
    x, tables, seg_ends, seg_slots, hs, grad_rows, base_likes = residuals
    dx, table_grads = smlm_group_backward(
        x, tables, hs, gs, seg_ends, seg_slots, grad_rows, interpret=interpret
    )
    dbases = tuple(
        None if like is None else g.astype(like.dtype)
        for g, like in zip(gs, base_likes, strict=True)
    )
    return dx, tuple((da, db, None) for da, db in table_grads), dbases, None, None, None, None


def smlm_group_backward(
    x: jax.Array,
    tables: Sequence[Table],
    hs: Sequence[jax.Array],
    gs: Sequence[jax.Array],
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    grad_rows: jax.Array | None = None,
    *,
    reduce_mid: Callable[[jax.Array], jax.Array] | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, tuple[tuple[jax.Array, jax.Array], ...]]:
    """The backward of ``smlm_group`` given the forward's ``hs`` and the outputs'
    cotangents ``gs``: ``(dx, ((da, db), ...))``, dx in x's dtype; rows at or past
    ``grad_rows`` get none.

    Args:
      reduce_mid: applied to every float32 ``mid = scale * g @ b^T`` ([T, R_g]) before
        its uses, e.g. a psum over a mesh axis when ``b`` and ``g`` hold one slice of
        ``D`` each (a column-parallel projection): dx and da are then the full ones.
    """
    dx, table_grads = None, []
    for i, ((a, b, scale), h, g) in enumerate(zip(tables, hs, gs, strict=True)):
        num_slots = a.shape[0]
        mid = segment_shrink(
            g,
            b,
            seg_ends,
            seg_slots,
            scale,
            grad_rows,
            w_transposed=True,
            out_dtype=x.dtype if reduce_mid is None else jnp.float32,
            interpret=interpret,
        )
        if reduce_mid is not None:
            mid = reduce_mid(mid).astype(x.dtype)
        last = i == len(tables) - 1
        dx = segment_expand(  # adds this projection's dx to the earlier ones'
            mid,
            a,
            seg_ends,
            seg_slots,
            jnp.ones((num_slots,), jnp.float32),
            dx,
            grad_rows,
            w_transposed=True,
            out_dtype=x.dtype if last else jnp.float32,
            interpret=interpret,
        )
        da = segment_outer(
            x,
            mid,
            seg_ends,
            seg_slots,
            None,
            grad_rows,
            num_slots=num_slots,
            out_dtype=a.dtype,
            interpret=interpret,
        )
        db = segment_outer(
            h,
            g,
            seg_ends,
            seg_slots,
            scale,
            grad_rows,
            num_slots=num_slots,
            out_dtype=b.dtype,
            interpret=interpret,
        )
        table_grads.append((da, db))
    return dx, tuple(table_grads)


_smlm_group.defvjp(_smlm_group_fwd, _smlm_group_bwd)
