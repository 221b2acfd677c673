"""Segmented multi-LoRA matmul (SMLM) with Pallas forward and backward kernels.

``smlm(x, a, b, scale, seg_ends, seg_slots, base)`` returns, for every row ``t``
in a segment served by adapter slot ``s``, ``base[t] + scale[s] * x[t] @ a[s] @ b[s]``
(``a``/``b`` stacked and rank-padded; see ``segments`` for the metadata).

The forward is two kernels, shrink (``h = x @ a[s]``, ``[T, R]``) and expand;
``h`` is saved for the backward, which is four kernels with ``g = dY``:

* ``mid = scale[s] * g @ b[s]^T``   (shrink, ``b`` transposed)
* ``dx  = mid @ a[s]^T``            (expand, ``a`` transposed)
* ``da[n] = sum_{t in n} x_t^T mid_t``         (grouped outer product)
* ``db[n] = scale[n] * sum_{t in n} h_t^T g_t`` (grouped outer product)

Only rows ``[0, grad_rows)`` take part in the backward when ``grad_rows`` is
given (training rows come first in a unified batch): serving rows then cost no
backward work and get ``dx = 0``. ``scale`` and the metadata are constants (no
gradient); ``base`` gets ``g`` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.expand import segment_expand
from pallas_kernels.outer import segment_outer
from pallas_kernels.shrink import segment_shrink


def smlm(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: jax.Array,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    base: jax.Array | None = None,
    grad_rows: jax.Array | int | None = None,
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
      interpret: run the kernels in interpret mode (default: unless on a GPU).
    Returns:
      ``[T, D]`` in ``base``'s dtype, else ``x``'s.
    """
    if grad_rows is not None:
        grad_rows = jnp.asarray(grad_rows, jnp.int32)
    return _smlm(interpret, x, a, b, scale, seg_ends, seg_slots, base, grad_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _smlm(interpret, x, a, b, scale, seg_ends, seg_slots, base, grad_rows):
    return _smlm_fwd(interpret, x, a, b, scale, seg_ends, seg_slots, base, grad_rows)[0]


def _smlm_fwd(interpret, x, a, b, scale, seg_ends, seg_slots, base, grad_rows):
    h = segment_shrink(x, a, seg_ends, seg_slots, interpret=interpret)
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
    # A zero-size array remembers base's dtype (or its absence) for the backward.
    base_like = None if base is None else jnp.zeros((0,), base.dtype)
    return y, (x, a, b, scale, seg_ends, seg_slots, h, grad_rows, base_like)


def _smlm_bwd(interpret, residuals, g):
    x, a, b, scale, seg_ends, seg_slots, h, grad_rows, base_like = residuals
    num_slots = a.shape[0]
    mid = segment_shrink(
        g,
        b,
        seg_ends,
        seg_slots,
        scale,
        grad_rows,
        w_transposed=True,
        out_dtype=x.dtype,
        interpret=interpret,
    )
    dx = segment_expand(
        mid,
        a,
        seg_ends,
        seg_slots,
        jnp.ones((num_slots,), jnp.float32),
        None,
        grad_rows,
        w_transposed=True,
        out_dtype=x.dtype,
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
    dbase = None if base_like is None else g.astype(base_like.dtype)
    return dx, da, db, None, None, None, dbase, None


_smlm.defvjp(_smlm_fwd, _smlm_bwd)
