"""Plain ``jnp`` reference for SMLM: the specification the kernels are tested against."""

from __future__ import annotations

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
) -> jax.Array:
    """``y[t] = base[t] + scale[s] * (x[t] @ a[s]) @ b[s]`` with ``s`` the slot of row ``t``.

    Args:
      x: ``[T, K]``; a: ``[N, K, R]``; b: ``[N, R, D]``; scale: ``[N]``.
      seg_ends, seg_slots: ``[S]`` int32 segment metadata (rows of slot ``-1``
        and rows past the last segment get ``base`` only).
      base: optional ``[T, D]``.
    Returns:
      ``[T, D]`` in ``base``'s dtype (else ``x``'s). Like the kernels (and PEFT),
      the shrunk ``x @ a[s]`` is rounded to ``x.dtype`` before the expand.
    """
    num_rows = x.shape[0]
    slot = token_slots(seg_ends, seg_slots, num_rows, a.shape[0])
    has_adapter = slot >= 0
    safe_slot = jnp.where(has_adapter, slot, 0)
    hi = lax.Precision.HIGHEST
    h = jnp.einsum(
        "tk,tkr->tr", x, a[safe_slot], precision=hi, preferred_element_type=jnp.float32
    ).astype(x.dtype)
    lora = jnp.einsum(
        "tr,trd->td", h, b[safe_slot], precision=hi, preferred_element_type=jnp.float32
    )
    lora = jnp.where(has_adapter[:, None], lora * scale[safe_slot][:, None], 0.0)
    if base is None:
        return lora.astype(x.dtype)
    return (base.astype(jnp.float32) + lora).astype(base.dtype)
