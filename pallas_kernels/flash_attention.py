"""Packed (varlen) flash attention: Pallas kernels, forward and backward.

``packed_attention(q, k, v, positions, segment_ids)`` computes
``loqjax.attention.reference_attention(q, k, v, positions, positions, segment_ids,
segment_ids, sliding_window)`` on every row with ``segment_id >= 0`` (FlashAttention-2:
blockwise online softmax, no ``[T, T]`` mask), and zeros on padding rows.

**Layout precondition** (what the packers produce; not checked, see
``packed_layout_ok``): the rows of one segment are contiguous and their positions
increase by exactly 1 from row to row (any start). Rows with a negative segment id
are padding, anywhere. Then query row ``i`` sees exactly the key rows
``[max(first_i, i - W + 1), i]`` (``first_i`` the first row of its segment, ``W`` the
window), so every block's range of interacting blocks follows from
``segment_ids`` alone (``_query_block_bounds``, ``_key_block_bounds``: O(T) ``jnp``
in the caller's jit, no host sync). A query block visits only the key blocks from
the start of its first row's segment (or window) up to its last row; the dk/dv
backward likewise. Inside that range the blocks that are fully visible to every
query row skip the mask; the (at most a few) straddling ones apply the exact
reference mask (same segment, ``positions[j] <= positions[i]``, window). A layout
that breaks the precondition gives wrong outputs silently (visible keys outside the
visited blocks are missed), so check new packers with ``packed_layout_ok``.

**NaN isolation** (as in the reference): 0 * NaN = NaN in a dot, so a non-finite
value would leak into every row sharing its block. The inputs are sanitised
(non-finite -> 0) before the kernels, which therefore only ever see finite values,
and a query is *poisoned* (output NaN) exactly when the reference poisons it: its
own q row, or a visible key's k or v row, holds a non-finite value. Under the
layout precondition the visible keys are a row interval, so "sees a bad key" is a
cumulative max over rows. In the backward, poisoned and padding queries get a zero
cotangent (a select, so a NaN cotangent is dropped too) and ``lse = +inf`` (their
probabilities are exactly 0); this gives the reference's gradients, which are 0 for
every non-finite input element and unchanged for every other segment. Values can also
overflow inside the kernels (finite q and k with infinite scores: an adapter diverging),
so the masked pairs of the straddling blocks go through selects, not products with 0.
A non-finite cotangent on a live query row (one whose later layers overflowed) is
zeroed the same way, and the gradients it would make non-finite are then set to NaN, as the
reference's: that query's dq row and the dk/dv rows of the keys it sees (under the
precondition, the keys from its segment start, or window, up to itself); every other
gradient is as without it.

Kernels (grids are (block, head); refs are whole ``[T, D]`` heads, sliced in-kernel):

* forward, grid (query block, q head): ``out`` and ``lse`` (base 2), written for
  every row (NaN for poisoned queries, 0 for padding).
* dq, grid (query block, q head): loops over the visible key blocks.
* dk/dv, grid (key block, kv head x ``dkv_head_splits``): loops over its share of the
  q heads of its GQA group and their query blocks that see it, summing dk/dv over them
  in registers, without repeating K/V to ``[T, Hq, D]`` and without atomics; with the
  group split over several programs, their float32 partial sums are added after.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.platform import axis_mask, block_mask, default_interpret, load

# Score of a masked pair: finite, so a row with no visible key in a block stays NaN-free
# (exp2(MASK - m) is exactly 0 once any real score is seen; jax's attention does the same).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_BIG = np.iinfo(np.int32).max // 2


@jax.jit
def packed_layout_ok(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Whether a layout meets ``packed_attention``'s precondition: bool scalar.

    Every segment id >= 0 occupies one contiguous run of rows whose positions increase
    by exactly 1 from row to row. A debugging aid (jitted jnp); the kernels trust it.
    """
    seg, pos = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
    same = (seg[1:] == seg[:-1]) & (seg[1:] >= 0)
    steps_ok = jnp.all(jnp.where(same, pos[1:] == pos[:-1] + 1, True))
    runs = jnp.sum((seg >= 0) & jnp.concatenate([jnp.array([True]), seg[1:] != seg[:-1]]))
    ids = jnp.sort(seg)
    distinct = jnp.sum((ids >= 0) & jnp.concatenate([jnp.array([True]), ids[1:] != ids[:-1]]))
    return steps_ok & (runs == distinct)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings of one ``packed_attention`` call (blocks already clipped)."""

    sliding_window: int | None
    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    dkv_head_splits: int
    interpret: bool

    @property
    def padded_multiple(self) -> int:
        return max(
            self.block_q,
            self.block_k,
            self.block_q_dq,
            self.block_k_dq,
            self.block_q_dkv,
            self.block_k_dkv,
        )


@functools.partial(
    jax.jit,
    static_argnames=(
        "sliding_window",
        "interpret",
        "block_q",
        "block_k",
        "block_q_dq",
        "block_k_dq",
        "block_q_dkv",
        "block_k_dkv",
        "num_warps",
        "num_stages",
        "num_warps_bwd",
        "num_stages_bwd",
        "dkv_head_splits",
    ),
)
def packed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    *,
    sliding_window: int | None = None,
    interpret: bool | None = None,
    block_q: int = 128,
    block_k: int = 64,
    block_q_dq: int = 64,
    block_k_dq: int = 64,
    block_q_dkv: int = 64,
    block_k_dkv: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    num_warps_bwd: int = 4,
    num_stages_bwd: int = 2,
    dkv_head_splits: int | None = None,
) -> jax.Array:
    """Causal grouped-query attention over a packed batch of segments, differentiable.

    Args:
      q: [T, Hq, D] queries, RoPE applied; k, v: [T, Hkv, D] keys (RoPE applied) and
        values, all of one float dtype. Hq must be a multiple of Hkv: query head h reads
        kv head ``h // (Hq // Hkv)`` (HF ``repeat_kv`` order). D: a power of two >= 16.
      positions: int32 [T], each row's position in its sequence.
      segment_ids: int32 [T], each row's sequence; negative for padding rows. Must meet
        the layout precondition (module docstring): each segment's rows contiguous,
        positions increasing by exactly 1.
      sliding_window: static window W: query i sees key j only if
        ``positions[i] - positions[j] < W``; None for full causal attention.
      interpret: run the kernels in interpret mode (default: unless on a GPU).
      block_q, block_k: forward query/key block rows. block_q_dq, block_k_dq: the dq
        kernel's; block_q_dkv, block_k_dkv: the dk/dv kernel's. Powers of two >= 16
        (Triton dots need every side >= 16); clipped to the padded batch.
      num_warps, num_stages: forward Triton settings; num_warps_bwd, num_stages_bwd: both
        backward kernels'.
      dkv_head_splits: how many dk/dv programs share a kv head's group of q heads (a
        divisor of Hq // Hkv; default all of it, one q head a program). Above 1, each
        writes float32 partial sums of its heads, added afterwards: more, shorter
        programs for the price of that traffic.

    The defaults are the fastest of ``bench_flash_attention.py --sweep`` at fine-tuning's
    shape (T = 2048 in two sequences, Hq 32, Hkv 8, D 128) on an H200 (RESULTS.md, run
    30): forward 156 -> 132 µs (4 warps, not 8), forward and backward 804 -> 445 µs with
    the backward's (4 warps, dk/dv blocks 64 x 64, one q head a program).

    Returns:
      [T, Hq, D] in v.dtype: the reference's output on segment rows (NaN for the queries
      it poisons: a non-finite value in the query's own q row or in a visible k/v row),
      0 on padding rows. Scores, softmax and accumulation are float32; the
      probabilities are cast to v.dtype for the value product, as in the reference.
      Gradients flow to q, k, v (not positions/segment_ids).
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (num_rows, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need [T, H, D] alike")
    if num_heads % num_kv_heads:
        raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
    if not q.dtype == k.dtype == v.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share one float dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim={head_dim} must be a power of two >= 16")
    if positions.shape != (num_rows,) or segment_ids.shape != (num_rows,):
        raise ValueError(f"positions {positions.shape}, segment_ids {segment_ids.shape}: need [T]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 or None")
    group = num_heads // num_kv_heads
    dkv_head_splits = group if dkv_head_splits is None else dkv_head_splits
    if dkv_head_splits < 1 or group % dkv_head_splits:
        raise ValueError(f"dkv_head_splits={dkv_head_splits} must divide Hq // Hkv = {group}")
    blocks = dict(
        block_q=block_q,
        block_k=block_k,
        block_q_dq=block_q_dq,
        block_k_dq=block_k_dq,
        block_q_dkv=block_q_dkv,
        block_k_dkv=block_k_dkv,
    )
    for name, size in blocks.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    # A block longer than the batch only wastes work: clip to the batch's power of two.
    cap = max(16, pl.next_power_of_2(num_rows))
    config = _Config(
        sliding_window=sliding_window,
        **{name: min(size, cap) for name, size in blocks.items()},
        num_warps=num_warps,
        num_stages=num_stages,
        num_warps_bwd=num_warps_bwd,
        num_stages_bwd=num_stages_bwd,
        dkv_head_splits=dkv_head_splits,
        interpret=default_interpret() if interpret is None else interpret,
    )
    return _packed_attention(
        config, q, k, v, positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
    )


# --- layout: per-row segment bounds and per-block visit ranges (plain jnp, O(T)) ---


class _Layout(NamedTuple):
    """Per-row layout, int32 [P] each, padded to P rows (a multiple of every block).

    Rows >= T are padding (segment -1). ``first``/``last``: the first and last row of
    the row's run of equal segment ids (its segment, by the precondition).
    """

    seg: jax.Array
    pos: jax.Array
    first: jax.Array
    last: jax.Array


def _layout(positions: jax.Array, segment_ids: jax.Array, padded_rows: int) -> _Layout:
    extra = padded_rows - segment_ids.shape[0]
    seg = jnp.pad(segment_ids, (0, extra), constant_values=-1)
    pos = jnp.pad(positions, (0, extra))
    row = jnp.arange(padded_rows, dtype=jnp.int32)
    change = seg[1:] != seg[:-1]
    starts = jnp.concatenate([jnp.array([True]), change])
    ends = jnp.concatenate([change, jnp.array([True])])
    first = lax.cummax(jnp.where(starts, row, 0))
    last = lax.cummin(jnp.where(ends, row, padded_rows - 1), reverse=True)
    return _Layout(seg, pos, first, last)


def _first_visible_row(layout: _Layout, window: int | None) -> jax.Array:
    """int32 [P]: the first key row each query row sees (its last is itself)."""
    if window is None:
        return layout.first
    row = jnp.arange(layout.seg.shape[0], dtype=jnp.int32)
    return jnp.maximum(layout.first, row - (window - 1))


def _last_visible_row(layout: _Layout, window: int | None) -> jax.Array:
    """int32 [P]: the last query row that sees each key row (its first is itself)."""
    if window is None:
        return layout.last
    row = jnp.arange(layout.seg.shape[0], dtype=jnp.int32)
    return jnp.minimum(layout.last, row + (window - 1))


def _blocked(x: jax.Array, num_blocks: int, block: int) -> jax.Array:
    return x[: num_blocks * block].reshape(num_blocks, block)


def _valid_span(layout: _Layout, num_blocks: int, block: int):
    """Per block: the first and last segment (non-padding) row, and whether any."""
    row = jnp.arange(layout.seg.shape[0], dtype=jnp.int32)
    valid = _blocked(layout.seg >= 0, num_blocks, block)
    rows = _blocked(row, num_blocks, block)
    lo = jnp.min(jnp.where(valid, rows, _BIG), axis=1)
    hi = jnp.max(jnp.where(valid, rows, -1), axis=1)
    return valid, lo, hi, hi >= 0


def _pack_bounds(begin, full_begin, full_end, end, any_valid, one_segment):
    """int32 [4, n]: ``begin <= full_begin <= full_end <= end``; empty when no rows."""
    begin = jnp.where(any_valid, begin, 0)
    end = jnp.where(any_valid, end, 0)
    has_full = one_segment & (full_begin < full_end)
    full_begin = jnp.where(has_full, jnp.clip(full_begin, begin, end), end)
    full_end = jnp.where(has_full, jnp.clip(full_end, full_begin, end), end)
    return jnp.stack([begin, full_begin, full_end, end]).astype(jnp.int32)


def _query_block_bounds(
    layout: _Layout, num_rows: int, block_q: int, block_k: int, window: int | None
) -> jax.Array:
    """For each query block, the key blocks it visits: int32 [4, cdiv(T, block_q)].

    Rows ``(begin, full_begin, full_end, end)``: key blocks ``[begin, end)`` hold every
    key a segment row of the block sees; those in ``[full_begin, full_end)`` are visible
    to all of its segment rows (no mask needed; padding rows' outputs are discarded).
    """
    n = pl.cdiv(num_rows, block_q)
    valid, first, last, any_valid = _valid_span(layout, n, block_q)
    lo_row = _blocked(_first_visible_row(layout, window), n, block_q)
    begin = jnp.min(jnp.where(valid, lo_row, _BIG), axis=1) // block_k
    end = last // block_k + 1
    # Fully visible key blocks: every segment row of the block is in one segment, and
    # the key block lies within [its segment start (or the last row's window), first].
    first_c, last_c = jnp.clip(first, 0, num_rows - 1), jnp.clip(last, 0, num_rows - 1)
    one_segment = any_valid & (layout.first[first_c] == layout.first[last_c])
    full_lo = layout.first[first_c]
    if window is not None:
        full_lo = jnp.maximum(full_lo, last - (window - 1))
    full_begin = -(-full_lo // block_k)
    full_end = (first + 1) // block_k
    return _pack_bounds(begin, full_begin, full_end, end, any_valid, one_segment)


def _key_block_bounds(
    layout: _Layout, num_rows: int, block_q: int, block_k: int, window: int | None
) -> jax.Array:
    """For each key block, the query blocks that see it: int32 [4, cdiv(T, block_k)].

    As ``_query_block_bounds`` with the roles swapped; full query blocks see every
    segment key row of the block (padding keys' dk/dv are zeroed on store).
    """
    n = pl.cdiv(num_rows, block_k)
    valid, first, last, any_valid = _valid_span(layout, n, block_k)
    hi_row = _blocked(_last_visible_row(layout, window), n, block_k)
    begin = first // block_q
    end = jnp.max(jnp.where(valid, hi_row, -1), axis=1) // block_q + 1
    first_c, last_c = jnp.clip(first, 0, num_rows - 1), jnp.clip(last, 0, num_rows - 1)
    one_segment = any_valid & (layout.first[first_c] == layout.first[last_c])
    full_hi = layout.last[first_c]
    if window is not None:
        full_hi = jnp.minimum(full_hi, first + (window - 1))
    full_begin = -(-last // block_q)
    full_end = (full_hi + 1) // block_q
    return _pack_bounds(begin, full_begin, full_end, end, any_valid, one_segment)


def _sanitise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` [T, H, D] with non-finite entries zeroed, and which (T, H) rows had any."""
    finite = jnp.isfinite(x)
    return jnp.where(finite, x, jnp.zeros((), x.dtype)), ~finite.all(axis=-1)


def _row_status(bad_q, bad_kv, layout: _Layout, window: int | None) -> jax.Array:
    """int32 [Hq, P]: 0 for a normal query, 1 padding (output 0), 2 poisoned (NaN).

    A query is poisoned iff its q row is bad or it sees a bad k/v row of its kv head;
    the keys it sees are rows [first visible, itself], so it sees one iff the latest bad
    row at or before it is at or after its first visible row.
    """
    num_rows, num_heads = bad_q.shape
    group = num_heads // bad_kv.shape[1]
    row = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
    latest_bad = lax.cummax(jnp.where(bad_kv, row, -1), axis=0)  # [T, Hkv]
    sees_bad = latest_bad >= _first_visible_row(layout, window)[:num_rows, None]
    poisoned = bad_q | jnp.repeat(sees_bad, group, axis=1)
    status = jnp.where(layout.seg[:num_rows, None] >= 0, jnp.where(poisoned, 2, 0), 1)
    extra = layout.seg.shape[0] - num_rows
    return jnp.pad(status.T, ((0, 0), (0, extra)), constant_values=1).astype(jnp.int32)


# --- kernels ---


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """float32 ``a @ b`` (``a.T``/``b.T`` as asked) at full input precision."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _visible(seg_q, pos_q, seg_k, pos_k, window: int | None):
    """bool [Bq, Bk]: the reference's mask on one block pair."""
    delta = pos_q[:, None] - pos_k[None, :]
    mask = (seg_q[:, None] == seg_k[None, :]) & (delta >= 0)
    if window is not None:
        mask &= delta < window
    return mask


def _visit(bounds, body, carry):
    """Run ``body(block, carry, masked=...)`` over the blocks ``[begin, end)``: the fully
    visible ones ``[full_begin, full_end)`` without the mask, the others with it.

    The masked blocks (before and after the full ones) share one loop, so the kernel
    holds two copies of the body, not three.
    """
    begin, full_begin, full_end, end = bounds
    before = full_begin - begin

    def masked(i, carry):
        block = jnp.where(i < before, begin + i, full_end + (i - before))
        return body(block, carry, masked=True)

    carry = lax.fori_loop(full_begin, full_end, functools.partial(body, masked=False), carry)
    return lax.fori_loop(0, before + (end - full_end), masked, carry)


def _fwd_kernel(
    bounds_ref,  # [4, num_q_blocks] int32
    seg_ref,
    pos_ref,  # [P] int32
    status_ref,  # [P] int32, this head's row status
    q_ref,  # [T, D], this q head
    k_ref,
    v_ref,  # [T, D], its kv head
    o_ref,  # [T, D]
    lse_ref,  # [P] float32, base 2
    *,
    num_rows: int,
    block_q: int,
    block_k: int,
    qk_scale: float,
    window: int | None,
):
    q_block = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    rows = pl.ds(q_block * block_q, block_q)
    row_mask = block_mask(axis_mask(q_block, block_q, num_rows), None)
    q = load(q_ref.at[rows, :], row_mask)
    seg_q, pos_q = seg_ref[rows], pos_ref[rows]

    def body(k_block, carry, *, masked):
        acc, row_max, row_sum = carry
        cols = pl.ds(k_block * block_k, block_k)
        col_mask = block_mask(axis_mask(k_block, block_k, num_rows), None)
        k = load(k_ref.at[cols, :], col_mask)
        v = load(v_ref.at[cols, :], col_mask)
        s = _dot(q, k, trans_b=True) * qk_scale  # log2 domain: exp2 below
        if masked:
            visible = _visible(seg_q, pos_q, seg_ref[cols], pos_ref[cols], window)
            s = jnp.where(visible, s, MASK_VALUE)
        next_max = jnp.maximum(row_max, s.max(axis=1))
        correction = jnp.exp2(row_max - next_max)
        p = jnp.exp2(s - next_max[:, None])
        row_sum = row_sum * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
        return acc, next_max, row_sum

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    bounds = [bounds_ref[i, q_block] for i in range(4)]
    acc, row_max, row_sum = _visit(bounds, body, carry)
    row_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # 0 only where no block was visited
    status = status_ref[rows][:, None]
    out = acc / row_sum[:, None]
    out = jnp.where(status == 0, out, jnp.where(status == 2, jnp.nan, 0.0))
    plgpu.store(o_ref.at[rows, :], out.astype(o_ref.dtype), mask=row_mask)
    lse_ref[rows] = row_max + jnp.log2(row_sum)


def _dq_kernel(
    bounds_ref,  # [4, num_q_blocks] int32
    seg_ref,
    pos_ref,  # [P] int32
    lse_ref,
    delta_ref,  # [P] float32, this head's; lse = +inf for dead rows
    q_ref,  # [T, D]
    k_ref,
    v_ref,  # [T, D], its kv head
    do_ref,  # [T, D], zero on dead rows
    dq_ref,  # [T, D]
    *,
    num_rows: int,
    block_q: int,
    block_k: int,
    qk_scale: float,
    sm_scale: float,
    window: int | None,
):
    q_block = pl.program_id(0)
    head_dim = q_ref.shape[-1]
    rows = pl.ds(q_block * block_q, block_q)
    row_mask = block_mask(axis_mask(q_block, block_q, num_rows), None)
    q = load(q_ref.at[rows, :], row_mask)
    do = load(do_ref.at[rows, :], row_mask)
    lse, delta = lse_ref[rows], delta_ref[rows]
    seg_q, pos_q = seg_ref[rows], pos_ref[rows]

    def body(k_block, dq, *, masked):
        cols = pl.ds(k_block * block_k, block_k)
        col_mask = block_mask(axis_mask(k_block, block_k, num_rows), None)
        k = load(k_ref.at[cols, :], col_mask)
        v = load(v_ref.at[cols, :], col_mask)
        s = _dot(q, k, trans_b=True) * qk_scale
        if masked:
            visible = _visible(seg_q, pos_q, seg_ref[cols], pos_ref[cols], window)
            s = jnp.where(visible, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        if masked:  # a select: 0 * inf (a huge masked value) would be NaN
            ds = jnp.where(visible, ds, 0.0)
        return dq + _dot(ds.astype(k.dtype), k)

    bounds = [bounds_ref[i, q_block] for i in range(4)]
    dq = _visit(bounds, body, jnp.zeros((block_q, head_dim), jnp.float32))
    plgpu.store(dq_ref.at[rows, :], (dq * sm_scale).astype(dq_ref.dtype), mask=row_mask)


def _dkv_kernel(
    bounds_ref,  # [4, num_k_blocks] int32
    seg_ref,
    pos_ref,  # [P] int32
    lse_ref,
    delta_ref,  # [G, P] float32, the group's q heads
    q_ref,
    do_ref,  # [T, G, D], the group's q heads
    k_ref,
    v_ref,  # [T, D], this kv head
    dk_ref,
    dv_ref,  # [T, D]
    *,
    num_rows: int,
    block_q: int,
    block_k: int,
    qk_scale: float,
    sm_scale: float,
    window: int | None,
):
    k_block = pl.program_id(0)
    _, group, head_dim = q_ref.shape
    cols = pl.ds(k_block * block_k, block_k)
    col_mask = block_mask(axis_mask(k_block, block_k, num_rows), None)
    k = load(k_ref.at[cols, :], col_mask)
    v = load(v_ref.at[cols, :], col_mask)
    seg_k, pos_k = seg_ref[cols], pos_ref[cols]

    def body(q_block, carry, *, head, masked):
        dk, dv = carry
        rows = pl.ds(q_block * block_q, block_q)
        row_mask = block_mask(axis_mask(q_block, block_q, num_rows), None)
        q = load(q_ref.at[rows, head, :], row_mask)
        do = load(do_ref.at[rows, head, :], row_mask)
        lse, delta = lse_ref[head, rows], delta_ref[head, rows]
        s = _dot(q, k, trans_b=True) * qk_scale  # [Bq, Bk]
        if masked:
            visible = _visible(seg_ref[rows], pos_ref[rows], seg_k, pos_k, window)
            s = jnp.where(visible, s, MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        if masked:  # a select: a query whose scores overflowed has lse NaN, so p NaN
            p = jnp.where(visible, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        if masked:
            ds = jnp.where(visible, ds, 0.0)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    bounds = [bounds_ref[i, k_block] for i in range(4)]

    def head_loop(head, carry):  # the group's q heads, summed into one dk/dv
        return _visit(bounds, functools.partial(body, head=head), carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_loop, (zeros, zeros))
    key = (seg_k >= 0)[:, None]  # padding keys in a full block picked up garbage
    dk = jnp.where(key, dk * sm_scale, 0.0)
    dv = jnp.where(key, dv, 0.0)
    plgpu.store(dk_ref.at[cols, :], dk.astype(dk_ref.dtype), mask=col_mask)
    plgpu.store(dv_ref.at[cols, :], dv.astype(dv_ref.dtype), mask=col_mask)


# --- pallas_calls and the custom VJP ---


def _params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _forward(cfg: _Config, q, k, v, layout: _Layout, status):
    """(out [T, Hq, D] in v.dtype, lse float32 [Hq, P]) from finite q, k, v."""
    num_rows, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    padded = layout.seg.shape[0]
    bounds = _query_block_bounds(layout, num_rows, cfg.block_q, cfg.block_k, cfg.sliding_window)
    head = pl.BlockSpec((padded, None, head_dim), lambda i, h: (0, h, 0))
    kv_head = pl.BlockSpec((padded, None, head_dim), lambda i, h: (0, h // group, 0))
    rows = pl.BlockSpec((padded,), lambda i, h: (0,))
    head_rows = pl.BlockSpec((None, padded), lambda i, h: (h, 0))
    kernel = functools.partial(
        _fwd_kernel,
        num_rows=num_rows,
        block_q=cfg.block_q,
        block_k=cfg.block_k,
        qk_scale=head_dim**-0.5 * math.log2(math.e),
        window=cfg.sliding_window,
    )
    return pl.pallas_call(
        kernel,
        grid=(bounds.shape[1], num_heads),
        in_specs=[
            pl.BlockSpec(bounds.shape, lambda i, h: (0, 0)),
            rows,
            rows,
            head_rows,
            head,
            kv_head,
            kv_head,
        ],
        out_specs=[head, head_rows],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, v.dtype),
            jax.ShapeDtypeStruct((num_heads, padded), jnp.float32),
        ],
        compiler_params=_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="packed_attention_fwd",
    )(bounds, layout.seg, layout.pos, status, q, k, v)


def _backward(cfg: _Config, q, k, v, layout: _Layout, lse, delta, do):
    """(dq, dk, dv) from finite q, k, v; ``do`` and ``delta`` zero and ``lse`` +inf
    on dead (padding or poisoned) query rows."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    padded = layout.seg.shape[0]
    window = cfg.sliding_window
    scales = dict(qk_scale=head_dim**-0.5 * math.log2(math.e), sm_scale=head_dim**-0.5)
    rows = pl.BlockSpec((padded,), lambda i, h: (0,))
    head = pl.BlockSpec((padded, None, head_dim), lambda i, h: (0, h, 0))

    bounds = _query_block_bounds(layout, num_rows, cfg.block_q_dq, cfg.block_k_dq, window)
    kv_of_head = pl.BlockSpec((padded, None, head_dim), lambda i, h: (0, h // group, 0))
    head_rows = pl.BlockSpec((None, padded), lambda i, h: (h, 0))
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            num_rows=num_rows,
            block_q=cfg.block_q_dq,
            block_k=cfg.block_k_dq,
            window=window,
            **scales,
        ),
        grid=(bounds.shape[1], num_heads),
        in_specs=[
            pl.BlockSpec(bounds.shape, lambda i, h: (0, 0)),
            rows,
            rows,
            head_rows,
            head_rows,
            head,
            kv_of_head,
            kv_of_head,
            head,
        ],
        out_specs=head,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg.num_warps_bwd, cfg.num_stages_bwd),
        interpret=cfg.interpret,
        name="packed_attention_dq",
    )(bounds, layout.seg, layout.pos, lse, delta, q, k, v, do)

    bounds = _key_block_bounds(layout, num_rows, cfg.block_q_dkv, cfg.block_k_dkv, window)
    splits = cfg.dkv_head_splits
    heads = group // splits  # the q heads of one program, consecutive within the group
    group_heads = pl.BlockSpec((padded, heads, head_dim), lambda i, h: (0, h, 0))
    group_rows = pl.BlockSpec((heads, padded), lambda i, h: (h, 0))
    kv_of_program = pl.BlockSpec((padded, None, head_dim), lambda i, h: (0, h // splits, 0))
    # Split, every program writes its own heads' partial sums, in float32.
    partial = jax.ShapeDtypeStruct((num_rows, num_kv_heads * splits, head_dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            num_rows=num_rows,
            block_q=cfg.block_q_dkv,
            block_k=cfg.block_k_dkv,
            window=window,
            **scales,
        ),
        grid=(bounds.shape[1], num_kv_heads * splits),
        in_specs=[
            pl.BlockSpec(bounds.shape, lambda i, h: (0, 0)),
            rows,
            rows,
            group_rows,
            group_rows,
            group_heads,
            group_heads,
            kv_of_program,
            kv_of_program,
        ],
        out_specs=[head, head],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype) if splits == 1 else partial,
            jax.ShapeDtypeStruct(v.shape, v.dtype) if splits == 1 else partial,
        ],
        compiler_params=_params(cfg.num_warps_bwd, cfg.num_stages_bwd),
        interpret=cfg.interpret,
        name="packed_attention_dkv",
    )(bounds, layout.seg, layout.pos, lse, delta, q, do, k, v)
    if splits > 1:
        dk, dv = (
            x.reshape(num_rows, num_kv_heads, splits, head_dim).sum(2).astype(k.dtype)
            for x in (dk, dv)
        )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _packed_attention(cfg, q, k, v, positions, segment_ids):
    return _packed_attention_fwd(cfg, q, k, v, positions, segment_ids)[0]


def _padded_rows(cfg: _Config, num_rows: int) -> int:
    return pl.cdiv(num_rows, cfg.padded_multiple) * cfg.padded_multiple


def _packed_attention_fwd(cfg, q, k, v, positions, segment_ids):
    layout = _layout(positions, segment_ids, _padded_rows(cfg, q.shape[0]))
    q, bad_q = _sanitise(q)
    k, bad_k = _sanitise(k)
    v, bad_v = _sanitise(v)
    status = _row_status(bad_q, bad_k | bad_v, layout, cfg.sliding_window)
    out, lse = _forward(cfg, q, k, v, layout, status)
    # The sanitised operands are what the backward differentiates: the gradient of a
    # non-finite element is then 0, as through the reference's where.
    return out, (q, k, v, positions, segment_ids, out, lse, status)


def _packed_attention_bwd(cfg, residuals, do):
    q, k, v, positions, segment_ids, out, lse, status = residuals
    num_rows = q.shape[0]
    layout = _layout(positions, segment_ids, lse.shape[1])
    dead = status != 0  # [Hq, P]: padding and poisoned queries get no gradient
    dead_rows = dead[:, :num_rows].T[..., None]  # [T, Hq, 1]
    do = jnp.where(dead_rows, jnp.zeros((), do.dtype), do)  # a select: drops NaN too
    do, bad_do = _sanitise(do)  # live rows' non-finite cotangents: poisoned below
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = jnp.where(dead_rows[..., 0], 0.0, delta).T  # out is NaN on poisoned rows
    delta = jnp.pad(delta, ((0, 0), (0, lse.shape[1] - num_rows)))
    lse = jnp.where(dead, jnp.inf, lse)  # exp2(s - inf) = 0: dead rows contribute nothing
    dq, dk, dv = _backward(cfg, q, k, v, layout, lse, delta, do.astype(v.dtype))
    dq, dk, dv = _poison_grads(dq, dk, dv, bad_do, layout, cfg.sliding_window)
    return dq, dk, dv, None, None


def _poison_grads(dq, dk, dv, bad_do, layout: _Layout, window: int | None):
    """The gradients with NaN where a non-finite cotangent (bool [T, Hq], which query
    rows had one) makes the reference's non-finite: those dq rows, and the dk/dv rows
    of every key their queries see. A key row is seen by the query rows from itself to
    its last visible row, so it is poisoned iff the first bad row at or after it is
    within that span."""
    num_rows, num_heads = bad_do.shape
    num_kv_heads = dk.shape[1]
    bad_kv = bad_do.reshape(num_rows, num_kv_heads, num_heads // num_kv_heads).any(axis=-1)
    row = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
    next_bad = lax.cummin(jnp.where(bad_kv, row, _BIG), axis=0, reverse=True)  # [T, Hkv]
    seen = next_bad <= _last_visible_row(layout, window)[:num_rows, None]
    dq = jnp.where(bad_do[..., None], jnp.array(jnp.nan, dq.dtype), dq)
    dk = jnp.where(seen[..., None], jnp.array(jnp.nan, dk.dtype), dk)
    dv = jnp.where(seen[..., None], jnp.array(jnp.nan, dv.dtype), dv)
    return dq, dk, dv


_packed_attention.defvjp(_packed_attention_fwd, _packed_attention_bwd)
