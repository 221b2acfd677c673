"""Token-level cross-entropy, summed per adapter slot."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-log softmax(logits[t])[targets[t]]`` for every row.

    Args:
      logits: float32 [T, V].
      targets: int32 [T]. An id outside [0, V) gives NaN rather than a silently clamped
        id, so bad data surfaces as a non-finite loss.

    Returns:
      float32 [T].
    """
    picked = jnp.take_along_axis(
        logits, targets[:, None], axis=-1, mode="fill", fill_value=jnp.nan
    )[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def slot_sums(
    values: jax.Array, mask: jax.Array, slots: jax.Array, num_slots: int
) -> tuple[jax.Array, jax.Array]:
    """Sums and counts of the masked ``values`` of each slot.

    A select, not a multiply, drops the other rows, so a non-finite value reaches only
    its own slot's sum (and its gradient only its own rows).

    Args:
      values: float32 [T].
      mask: bool [T], rows that count.
      slots: int32 [T], each row's slot; rows outside [0, num_slots) never count.
      num_slots: N.

    Returns:
      (float32 [N] sums, int32 [N] counts).
    """
    member = mask[:, None] & (slots[:, None] == jnp.arange(num_slots)[None, :])
    sums = jnp.sum(jnp.where(member, values[:, None], 0.0), axis=0)
    return sums, jnp.sum(member, axis=0, dtype=jnp.int32)
