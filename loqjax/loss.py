"""Token-level cross-entropy, summed per adapter slot."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from loqjax.layers import output_logits

LOSS_CHUNK_ROWS = 1024
"""Rows of logits ``head_token_losses`` holds at once: [1024, V] float32 is 0.5 GB for
Llama 3's 128256-token vocabulary, against 4.2 GB for the 8192 rows of four adapters'
2 x 1024-token sequences."""


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-log softmax(logits[t])[targets[t]]`` for every row.

    Args:
      logits: float32 [T, V].
      targets: int32 [T]. An id outside [0, V) gives NaN rather than a silently clamped
        id, so bad data surfaces as a non-finite loss.

    Returns:
      float32 [T].
    """
    return jax.nn.logsumexp(logits, axis=-1) - _target_logits(logits, targets)


def _target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 [T]: each row's logit of its target, NaN for an id outside [0, V)."""
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1, mode="fill", fill_value=jnp.nan)
    return picked[:, 0]


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


def head_token_losses(
    x: jax.Array, table: jax.Array, targets: jax.Array, *, chunk_rows: int = LOSS_CHUNK_ROWS
) -> jax.Array:
    """``token_cross_entropy(output_logits(x, table), targets)`` that never holds the
    logits of more than ``chunk_rows`` rows, forward or backward.

    Under differentiation, each chunk's forward also multiplies its ``softmax - onehot``
    (rounded to x's dtype, as ``output_logits``' backward rounds its cotangent) by the
    table, and the backward scales those rows by the losses' cotangent: no logits are
    kept for the backward. For cotangents of 0 and 1 (a sum of selected losses) that is
    the unchunked gradient up to float32 rounding of the softmax; for others the rounding
    to x's dtype comes before the scaling instead of after. A table gradient, if asked
    for, recomputes the chunks' logits.

    Args:
      x: [T, d] final hidden rows (normed); table: [V, d] the output head.
      targets: int32 [T]; an id outside [0, V) gives NaN (see ``token_cross_entropy``).
      chunk_rows: static, the most rows a chunk has.

    Returns:
      float32 [T].
    """
    num_rows = x.shape[0]
    num_chunks = max(1, -(-num_rows // chunk_rows))
    # Equal chunks of at most chunk_rows rows: the padding is under one row a chunk.
    return _head_token_losses(max(1, -(-num_rows // num_chunks)), x, table, targets)


def _chunks(x: jax.Array, chunk_rows: int) -> jax.Array:
    """[T, ...] -> [C, chunk_rows, ...], zero-padded to whole chunks."""
    pad = -x.shape[0] % chunk_rows
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, chunk_rows, *x.shape[1:])


def _unchunk(x: jax.Array, num_rows: int) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])[:num_rows]


def _chunk_logits(x, table, targets, lse=None):
    """A chunk's (float32 logits [c, V], lse [c], softmax - onehot [c, V])."""
    logits = output_logits(x, table)
    if lse is None:
        lse = jax.nn.logsumexp(logits, axis=-1)
    onehot = jnp.arange(table.shape[0])[None, :] == targets[:, None]
    return logits, lse, jnp.exp(logits - lse[:, None]) - onehot


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_token_losses(chunk_rows, x, table, targets):
    def chunk(args):
        x, targets = args
        return token_cross_entropy(output_logits(x, table), targets)

    losses = jax.lax.map(chunk, (_chunks(x, chunk_rows), _chunks(targets, chunk_rows)))
    return _unchunk(losses, x.shape[0])


def _head_token_losses_fwd(chunk_rows, x, table, targets):
    def chunk(args):
        x, targets = args
        logits, lse, dlogits = _chunk_logits(x, table, targets)
        dx = jnp.einsum(
            "tv,vd->td", dlogits.astype(x.dtype), table, preferred_element_type=jnp.float32
        )
        return lse - _target_logits(logits, targets), lse, dx

    losses, lse, dx_unit = jax.lax.map(
        chunk, (_chunks(x, chunk_rows), _chunks(targets, chunk_rows))
    )
    num_rows = x.shape[0]
    losses = _unchunk(losses, num_rows)
    return losses, (x, table, targets, _unchunk(lse, num_rows), _unchunk(dx_unit, num_rows))


def _head_token_losses_bwd(chunk_rows, residuals, g):
    x, table, targets, lse, dx_unit = residuals
    dx = (g[:, None] * dx_unit).astype(x.dtype)
    # Unrolled, not a loop: XLA drops all of it when the table takes no gradient.
    dtable = jnp.zeros(table.shape, jnp.float32)
    for start in range(0, x.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        _, _, dlogits = _chunk_logits(x[rows], table, targets[rows], lse[rows])
        dlogits = (g[rows, None] * dlogits).astype(table.dtype)
        dtable += jnp.einsum("tv,td->vd", dlogits, x[rows], preferred_element_type=jnp.float32)
    return dx, dtable.astype(table.dtype), None


_head_token_losses.defvjp(_head_token_losses_fwd, _head_token_losses_bwd)
