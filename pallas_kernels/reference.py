"""Plain ``jnp`` SMLM: the specification the kernels are tested against, and the path
off GPU (``platform.use_kernels``).

It loops over the table's slots (a ``lax.scan``) instead of gathering each row's
adapter: one ``[T, K] @ [K, R]`` and one ``[T, R] @ [R, D]`` matmul a slot, on the rows
of that slot alone (the others are zeroed going in and dropped coming out, with
selects, so a slot's non-finite weights or a row's non-finite input reach no other row
or slot, forward or backward). Its cost is ``N`` times the adapter work of the batch,
which off GPU, with the few slots of tests and demos, is far less than the base matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.segments import token_slots


def smlm_reference(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: jax.Array,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    base: jax.Array | None = None,
    grad_rows: jax.Array | int | None = None,
) -> jax.Array:
    """``y[t] = base[t] + scale[s] * (x[t] @ a[s]) @ b[s]`` with ``s`` the slot of row ``t``.

    Differentiable, with ``smlm``'s gradients: only rows before ``grad_rows`` reach
    ``x``, ``a`` and ``b``; ``base`` gets the cotangent unchanged.

    Args:
      x: ``[T, K]``; a: ``[N, K, R]``; b: ``[N, R, D]``; scale: ``[N]``.
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (rows of slot ``-1``
        and rows past the last segment get ``base`` only).
      base: optional ``[T, D]``.
      grad_rows: optional int32 scalar: only rows before it get gradients.
    Returns:
      ``[T, D]`` in ``base``'s dtype (else ``x``'s). Like the kernels (and PEFT),
      the shrunk ``x @ a[s]`` is rounded to ``x.dtype`` before the expand.

    >>> x = jnp.ones((3, 2)); a = jnp.ones((1, 2, 1)); b = jnp.ones((1, 1, 2))
    >>> ends, slots = jnp.array([2], jnp.int32), jnp.array([0], jnp.int32)
    >>> smlm_reference(x, a, b, jnp.array([0.5]), ends, slots).tolist()
    [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    """
    (y,) = smlm_group_reference(x, [(a, b, scale)], [base], seg_ends, seg_slots, grad_rows)
    return y


def smlm_group_reference(
    x: jax.Array,
    tables: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
    bases: Sequence[jax.Array | None],
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    grad_rows: jax.Array | int | None = None,
) -> tuple[jax.Array, ...]:
    """``smlm_reference`` of several projections of the same rows (``smlm_group``'s
    arguments and results, without its row tiles)."""
    num_rows = x.shape[0]
    slot = token_slots(seg_ends, seg_slots, num_rows, tables[0][0].shape[0])
    ys = []
    for (a, b, scale), base in zip(tables, bases, strict=True):
        term = _adapter_term(x, a, b, scale.astype(jnp.float32), slot)
        if grad_rows is not None:
            term = _rows_before(term, jnp.asarray(grad_rows, jnp.int32))
        if base is None:
            ys.append(term.astype(x.dtype))
        else:
            ys.append((base.astype(jnp.float32) + term).astype(base.dtype))
    return tuple(ys)


def _adapter_term(x, a, b, scale, slot):
    """float32 ``scale[s] * round(x @ a[s]) @ b[s]`` per row (0 on adapter-free rows)."""
    hi = lax.Precision.HIGHEST

    def one_slot(term, slot_tables):
        n, a_n, b_n, scale_n = slot_tables
        rows = (slot == n)[:, None]
        h = jnp.dot(jnp.where(rows, x, 0), a_n, precision=hi, preferred_element_type=jnp.float32)
        out = jnp.dot(h.astype(x.dtype), b_n, precision=hi, preferred_element_type=jnp.float32)
        return jnp.where(rows, out * scale_n, term), None

    init = jnp.zeros((x.shape[0], b.shape[2]), jnp.float32)
    slots = jnp.arange(a.shape[0], dtype=jnp.int32)
    return lax.scan(one_slot, init, (slots, a, b, scale))[0]


@jax.custom_vjp
def _rows_before(term: jax.Array, grad_rows: jax.Array) -> jax.Array:
    """``term``, whose cotangent reaches only its rows before ``grad_rows``."""
    return term


def _rows_before_fwd(term, grad_rows):
    return term, grad_rows


def _rows_before_bwd(grad_rows, g):
    keep = jnp.arange(g.shape[0])[:, None] < grad_rows
    return jnp.where(keep, g, 0), None


_rows_before.defvjp(_rows_before_fwd, _rows_before_bwd)
