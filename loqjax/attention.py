"""Attention over packed token batches, without and with a paged KV cache.

``packed_attention`` and ``cached_attention`` are what the model calls; each runs either
the Pallas GPU kernel or the plain-jnp reference here (materialised mask), which is the
specification the kernels are tested against:

* ``"pallas"``: ``pallas_kernels.packed_attention`` / ``pallas_kernels.paged_attention``
  (compiled by Triton on a GPU, interpreted elsewhere: exact but slow);
* ``"reference"``: ``reference_attention`` / ``paged_attention`` below;
* ``"auto"``: the kernels on a GPU, the references elsewhere (CPU tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.platform import KernelImpl, use_kernels

if TYPE_CHECKING:
    from loqjax.kv_cache import LayerKV


def packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    *,
    sliding_window: int | None = None,
    impl: KernelImpl = "auto",
) -> jax.Array:
    """Causal attention of a packed batch within its segments: ``reference_attention``
    with queries and keys the same rows. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    The kernel needs each segment's rows contiguous with positions rising by one (as the
    packers lay them out) and is differentiable.
    """
    if use_kernels(impl):
        return pallas_kernels.packed_attention(
            q, k, v, positions, segment_ids, sliding_window=sliding_window
        )
    return reference_attention(
        q, k, v, positions, positions, segment_ids, segment_ids, sliding_window
    )


def cached_attention(
    q: jax.Array,
    kv: LayerKV,
    page_tables: jax.Array,
    q_pos: jax.Array,
    q_seg: jax.Array,
    *,
    sliding_window: int | None = None,
    impl: KernelImpl = "auto",
) -> jax.Array:
    """``paged_attention`` (same arguments), on the kernel or the reference; not
    differentiable (serving only)."""
    if use_kernels(impl):
        return pallas_kernels.paged_attention(
            q, kv.k, kv.v, page_tables, q_pos, q_seg, sliding_window=sliding_window
        )
    return paged_attention(q, kv, page_tables, q_pos, q_seg, sliding_window)


def attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array,
    k_seg: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Which keys each query may attend to, bool [T, S].

    Query i sees key j iff they share a segment id, ``k_pos[j] <= q_pos[i]`` (causal) and,
    with a sliding window, ``q_pos[i] - k_pos[j] < sliding_window``.

    Args:
      q_pos, q_seg: int32 [T], position and segment id of each query.
      k_pos, k_seg: int32 [S], position and segment id of each key.
      sliding_window: static window length in tokens, or None for full causal attention.
    """
    delta = q_pos[:, None] - k_pos[None, :]
    mask = (q_seg[:, None] == k_seg[None, :]) & (delta >= 0)
    if sliding_window is not None:
        mask &= delta < sliding_window
    return mask


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array,
    k_seg: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Grouped-query softmax attention with the mask of ``attention_mask``.

    Query head h reads kv head ``h // (Hq // Hkv)`` (HF's ``repeat_kv`` order). Scores and
    softmax are float32; the probabilities are cast back to v.dtype for the value product.
    A query with no visible key (only possible for padding) gets 0 instead of NaN, so
    padding rows stay finite.

    Args:
      q: [T, Hq, D] queries, RoPE applied.
      k, v: [S, Hkv, D] keys (RoPE applied) and values; Hq must be a multiple of Hkv.
      q_pos, q_seg: int32 [T]; k_pos, k_seg: int32 [S] (see ``attention_mask``).
      sliding_window: static window length, or None.

    Returns:
      [T, Hq, D] in v.dtype.
    """
    t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    # Masked pairs get probability (and cotangent) exactly 0, but 0 * NaN = NaN, forward and
    # backward: a non-finite q, k or v in one segment (an adapter slot gone bad, say) would
    # leak into every other. So attend over zeroed copies, then poison exactly the queries
    # whose own head or visible keys hold a non-finite value (and, in the backward, see
    # ``_attend``).
    q, bad_q = _zero_non_finite(q)
    k, bad_k = _zero_non_finite(k)
    v, bad_v = _zero_non_finite(v)
    q = q.reshape(t, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = attention_mask(q_pos, k_pos, q_seg, k_seg, sliding_window)
    out = _attend(q, k, v, mask)
    sees_bad = jnp.einsum(
        "ts,sk->tk", mask.astype(jnp.float32), (bad_k | bad_v).astype(jnp.float32)
    )
    poisoned = (sees_bad > 0)[:, :, None] | bad_q.reshape(t, num_kv_heads, -1)
    out = jnp.where(poisoned[..., None], jnp.nan, out)
    return out.reshape(t, num_heads, head_dim)


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention of finite q [T, Hkv, G, D] over finite k, v [S, Hkv, D];
    mask bool [T, S]. Out [T, Hkv, G, D] in v.dtype.

    Values overflow inside it too (finite q and k whose scores are infinite: an adapter
    diverging), and its backward keeps a non-finite cotangent in its segment: one on a
    live query row (a row whose later layers overflowed) would reach every key row
    through the masked pairs' zero probabilities (0 * NaN in the value product). So the
    gradients are computed from the zeroed cotangent, then poisoned (NaN) exactly where
    the exact gradient is non-finite: the query rows with such a cotangent, and the key
    and value rows they see.
    """
    return _attend_impl(q, k, v, mask)


def _attend_impl(q, k, v, mask):
    head_dim = q.shape[-1]
    scores = jnp.einsum("tkgd,skd->kgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    # A finite fill keeps fully masked rows NaN-free; the select after the softmax makes
    # masked probabilities exactly 0 even in a row whose own scores overflowed (its
    # normalisation is NaN), and drops their cotangents (which overflow when a masked key's
    # value is huge) before the softmax backward sums them over the row.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
    return jnp.einsum("kgts,skd->tkgd", probs, v)


def _attend_fwd(q, k, v, mask):
    return _attend_impl(q, k, v, mask), (q, k, v, mask)


def _attend_bwd(residuals, g):
    q, k, v, mask = residuals
    g, bad_g = _zero_non_finite(g.reshape(g.shape[0], -1, g.shape[-1]))
    g = g.reshape(q.shape[:-1] + g.shape[-1:])
    bad_g = bad_g.reshape(q.shape[:-1])  # [T, Hkv, G]
    _, vjp = jax.vjp(lambda q, k, v: _attend_impl(q, k, v, mask), q, k, v)
    dq, dk, dv = vjp(g)
    seen = jnp.einsum("ts,tk->sk", mask.astype(jnp.float32), bad_g.any(-1).astype(jnp.float32))
    nan = jnp.array(jnp.nan, dq.dtype)
    dq = jnp.where(bad_g[..., None], nan, dq)
    dk = jnp.where((seen > 0)[..., None], nan, dk)
    dv = jnp.where((seen > 0)[..., None], nan, dv)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _zero_non_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` [N, H, D] with non-finite entries zeroed, and which (N, H) rows had any."""
    finite = jnp.isfinite(x)
    return jnp.where(finite, x, 0), ~finite.all(axis=-1)


def paged_attention(
    q: jax.Array,
    kv: LayerKV,
    page_tables: jax.Array,
    q_pos: jax.Array,
    q_seg: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """``reference_attention`` of packed queries over their sequences' cached pages.

    Every sequence's pages are gathered onto one key axis, each key tagged with its
    sequence (segment id = row of ``page_tables``) and its position in that sequence.
    Query i then sees exactly the keys of its own sequence at positions <= q_pos[i]: all
    written by this or an earlier step, while the causal mask hides every slot not yet
    written. The reference costs O(T * S * M * page_size); a GPU kernel would read only
    each query's own pages.

    Args:
      q: [T, Hq, D] queries, RoPE applied; their keys and values already in ``kv``.
      kv: the layer's pools, [num_pages, page_size, Hkv, D] each.
      page_tables: int32 [S, M], the pages of sequence s (see ``PageBatch``).
      q_pos: int32 [T], each query's position in its sequence; q_seg: int32 [T], its
        sequence (row of ``page_tables``), -1 for padding.
      sliding_window: static window length, or None.

    Returns:
      [T, Hq, D] in the pools' dtype.
    """
    k, v = kv.gather(page_tables)
    s, m = page_tables.shape
    length = m * kv.k.shape[1]
    k_pos = jnp.tile(jnp.arange(length, dtype=jnp.int32), s)
    k_seg = jnp.repeat(jnp.arange(s, dtype=jnp.int32), length)
    return reference_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, sliding_window)
