"""Paged attention for the serving step: prefill chunks and decode tokens over a paged KV
cache, forward only.

The step packs ``T`` query rows of up to ``S`` sequences; the keys and values of every
sequence live in pages of one pool per layer, ``[P, page_size, Hkv, D]``, and row s of
``page_tables`` lists sequence s's pages in position order (see ``loqjax.kv_cache``).

Work is cut into *query tiles*: runs of rows of one sequence (never straddling two), each
program owning one tile and one kv head. GQA folds the group's ``g = Hq // Hkv`` query
heads into the dot's M dimension, ``M = rows * g`` (g padded to a power of two), so one
program serves all heads that read its kv head and streams that head's pages once. Tiles
come in two static sizes, each its own kernel launch:

* decode tiles, ``M = 16`` by default (one decode row with g = 4 pads M to 16, not to 64),
  for runs of at most ``16 // g`` rows: memory-bound, so the key axis may also be split
  over ``k_splits`` programs whose partial softmax statistics are combined afterwards
  (flash-decoding);
* prefill tiles, ``M = 128`` by default, for longer runs (their last partial tile goes to
  the decode kernel if it is short enough).

Each program loops over its tile's key range ``block_k`` keys at a time, gathering the
slots of ``block_k // page_size`` pages through the page table. Blocks that every row of
the tile sees entirely take an unmasked fast path; the boundary blocks (the causal
diagonal, the sliding window's far edge, the partly written last page) are masked: hidden
scores are replaced before the softmax and non-finite values zeroed before the value dot
(its masked probabilities are 0, but 0 * NaN = NaN), so stale slots (a previous owner's
NaN, or another sequence's page past the end of the table) never reach the output. A
non-finite value a query does see poisons that query (NaN), as in
``loqjax.attention.reference_attention``; it cannot reach another sequence, whose rows are
in other tiles.

The tile plan is plain jnp inside the caller's jit (no host sync), so one compile serves
every batch layout of a given capacity.

Relied on (the serving step guarantees it): the rows of one sequence are contiguous in the
batch, their positions are below ``M * page_size``, and page table entries are valid page
ids (entries past a sequence's last needed page may be any, even another sequence's).
Nothing is assumed about the order of sequences or of positions within a run: each tile
reads its rows' positions and spans their min..max.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.platform import covering, default_interpret, load, tile_reach

# Masked scores: finite, so a fully masked row never computes inf - inf.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
# Decode is memory-bound: aim for about four programs per SM of an H100 (132 SMs) so
# loads from several programs overlap. A guess to tune on the device, not a measurement.
DECODE_TARGET_PROGRAMS = 512


class AttentionBlocks(NamedTuple):
    """Static tiling of one of the two kernels.

    Attributes:
      block_m: dot M side, query rows times the padded GQA group; a power of two >= 16.
        A tile holds ``max(1, block_m // g_pad)`` rows.
      block_k: keys per loop iteration (``block_k // page_size`` pages, or a part of one
        page when pages are larger); a power of two >= 16.
      k_splits: programs per (tile, kv head) along the key axis, or None for a default
        from the static shapes (see ``_default_k_splits``).
      num_warps, num_stages: Triton launch parameters.
    """

    block_m: int
    block_k: int
    k_splits: int | None
    num_warps: int
    num_stages: int


DECODE_BLOCKS = AttentionBlocks(block_m=16, block_k=128, k_splits=None, num_warps=4, num_stages=2)
PREFILL_BLOCKS = AttentionBlocks(block_m=128, block_k=64, k_splits=1, num_warps=8, num_stages=2)


class QueryTiles(NamedTuple):
    """Query tiles of one size class; int32 [W] each.

    Tile w covers rows ``[start[w], start[w] + length[w])`` of sequence ``seg[w]`` (-1:
    padding rows, written as zeros). Tiles past the real count have ``length == 0``.
    """

    seg: jax.Array
    start: jax.Array
    length: jax.Array


class TilePlan(NamedTuple):
    """Both classes' tiles and where every row went; per-row arrays are int32 [T].

    ``row_small``: 1 if the row is in a decode-class tile. ``row_tile``, ``row_offset``:
    its tile's index within its class and its offset in that tile.
    """

    small: QueryTiles
    large: QueryTiles
    row_small: jax.Array
    row_tile: jax.Array
    row_offset: jax.Array


def plan_query_tiles(q_seg: jax.Array, num_seqs: int, large_rows: int, small_rows: int) -> TilePlan:
    """Cuts every run of equal segment ids into tiles of ``large_rows`` rows; a run's last
    tile goes to the small class if it has at most ``small_rows`` rows (a decode row, a
    chunk's short tail).

    Static bounds: each run adds at most one small tile, and with contiguous sequences
    there are at most ``num_seqs + 1`` runs (the last one padding), so the small class has
    ``min(T, S + 1)`` tiles and the large one ``cdiv(T, large_rows)`` plus one per run
    whose last tile is too long for a small one. Ids outside ``[0, S)`` count as padding.
    """
    num_rows = q_seg.shape[0]
    small_rows = min(small_rows, large_rows)
    seg = jnp.where((q_seg >= 0) & (q_seg < num_seqs), q_seg, -1).astype(jnp.int32)
    row = jnp.arange(num_rows, dtype=jnp.int32)
    change = seg[1:] != seg[:-1]
    first = jnp.concatenate([jnp.ones((1,), bool), change])
    last = jnp.concatenate([change, jnp.ones((1,), bool)])
    run_start = lax.cummax(jnp.where(first, row, 0))
    run_end = lax.cummin(jnp.where(last, row + 1, num_rows), reverse=True)
    tile_first = run_start + (row - run_start) // large_rows * large_rows
    tile_len = jnp.minimum(run_end - tile_first, large_rows)
    small = (tile_first + large_rows >= run_end) & (tile_len <= small_rows)
    head = row == tile_first

    def compact(in_class, num_tiles):
        rank = jnp.cumsum(head & in_class, dtype=jnp.int32) - 1
        index = jnp.where(head & in_class, rank, num_tiles)  # out of range: dropped
        tiles = QueryTiles(
            jnp.full((num_tiles,), -1, jnp.int32).at[index].set(seg, mode="drop"),
            jnp.zeros((num_tiles,), jnp.int32).at[index].set(row, mode="drop"),
            jnp.zeros((num_tiles,), jnp.int32).at[index].set(tile_len, mode="drop"),
        )
        return tiles, rank[tile_first]

    num_small = min(num_rows, num_seqs + 1)
    num_large = pl.cdiv(num_rows, large_rows) + min(num_seqs + 1, num_rows // (small_rows + 1))
    small_tiles, small_rank = compact(small, num_small)
    large_tiles, large_rank = compact(~small, num_large)
    return TilePlan(
        small_tiles,
        large_tiles,
        small.astype(jnp.int32),
        jnp.where(small, small_rank, large_rank),
        row - tile_first,
    )


def _any(mask: jax.Array, axis: int) -> jax.Array:
    """``mask.any(axis)`` as an int32 max, a reduction every backend lowers."""
    return jnp.max(mask.astype(jnp.int32), axis=axis)


def _attention_kernel(
    seg_ref,
    start_ref,
    length_ref,  # [W] int32 each: the tiles
    q_pos_ref,  # [T] int32
    page_tables_ref,  # [S, M] int32
    q_ref,  # [T, Hkv, G, D], G the padded group
    k_ref,
    v_ref,  # [P * page_size, Hkv, D] each: the pools, flat over slots
    *refs,  # (aliased previous output,) then out [T, Hkv, G, D], or the split partials
    rows: int,
    group: int,
    block_k: int,
    page_size: int,
    window: int | None,
    k_splits: int,
    aliased: bool,
):
    refs = refs[1:] if aliased else refs  # the aliased input is the output buffer itself
    tile, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seg, start, length = seg_ref[tile], start_ref[tile], length_ref[tile]
    _, _, group_pad, head_dim = q_ref.shape
    num_slots = k_ref.shape[0]
    max_pages = page_tables_ref.shape[1]
    block_m = rows * group_pad

    row_ok = jnp.arange(rows) < length  # [R]
    lane_ok_2d = row_ok[:, None] & (jnp.arange(group_pad) < group)[None, :]  # [R, G]
    lane_ok = lane_ok_2d.reshape(block_m)
    row_pos = load(q_pos_ref.at[pl.ds(start, rows)], row_ok)  # [R]
    pos = jnp.broadcast_to(row_pos[:, None], (rows, group_pad)).reshape(block_m)  # [M]
    q = load(q_ref.at[pl.ds(start, rows), head, :, :], lane_ok_2d[:, :, None])
    q = q.reshape(block_m, head_dim)
    q_finite = jnp.isfinite(q)
    q_bad = _any(~q_finite, axis=1)  # a non-finite query poisons its own head only
    q = jnp.where(q_finite, q, 0).astype(k_ref.dtype)
    scale = head_dim**-0.5 * _LOG2E  # scores in log2 units: exp2 below

    # The tile's key blocks: [lo, hi), and within them [full_lo, full_hi), the blocks every
    # row sees entirely (no mask needed). Padding tiles have none.
    has_keys = (length > 0) & (seg >= 0)
    pos_max = jnp.where(has_keys, jnp.max(jnp.where(row_ok, row_pos, 0)), 0)
    pos_min = jnp.min(jnp.where(row_ok, row_pos, pos_max))
    hi = jnp.where(has_keys, pos_max // block_k + 1, 0)
    if window is None:
        lo = full_lo = jnp.int32(0)
    else:
        lo = jnp.maximum(pos_min - window + 1, 0) // block_k
        full_lo = pl.cdiv(jnp.maximum(pos_max - window + 1, 0), block_k)
    lo = jnp.minimum(lo, hi)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip((pos_min + 1) // block_k, full_lo, hi)
    # This program's share of the key blocks (flash-decoding split).
    per_split = pl.cdiv(hi - lo, k_splits)
    split_lo = lo + split * per_split
    split_hi = jnp.minimum(split_lo + per_split, hi)
    safe_seg = jnp.maximum(seg, 0)

    def step(block, carry, masked: bool):
        acc, m_prev, l_prev, bad = carry
        key_pos = block * block_k + jnp.arange(block_k)  # [K]
        page_index = jnp.minimum(lax.div(key_pos, page_size), max_pages - 1)
        page = page_tables_ref[safe_seg, page_index]
        slot = jnp.clip(page * page_size + lax.rem(key_pos, page_size), 0, num_slots - 1)
        k = k_ref[slot, head, :]  # [K, D], one gathered row per key
        v = v_ref[slot, head, :]
        s = lax.dot_general(
            q,
            k,
            (((1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        s = s * scale  # [M, K]
        # A non-finite key makes its scores non-finite (q is finite): the queries that
        # see one are poisoned, even where it would only give a score of -inf.
        s_finite = jnp.isfinite(s)
        if masked:
            visible = (key_pos[None, :] <= pos[:, None]) & lane_ok[:, None]
            if window is not None:
                visible &= pos[:, None] - key_pos[None, :] < window
            v_finite = jnp.isfinite(v)
            v_bad = _any(~v_finite, axis=1)  # [K]
            sees_bad = visible & (~s_finite | (v_bad[None, :] > 0))
            bad = jnp.maximum(bad, _any(sees_bad, axis=1))
            keep = visible & s_finite
            s = jnp.where(keep, s, _MASK_VALUE)
            v = jnp.where(v_finite, v, 0)  # stale NaN * probability 0 would be NaN
        else:  # every key visible to every row; a non-finite value shows in acc or l
            bad = jnp.maximum(bad, _any(~s_finite, axis=1))
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if masked:
            p = jnp.where(keep, p, 0.0)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        return correction[:, None] * acc + pv, m_next, l_next, bad

    carry = (
        jnp.zeros((block_m, head_dim), jnp.float32),
        jnp.full((block_m,), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_m,), jnp.float32),
        q_bad,
    )
    for begin, end, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
        begin, end = jnp.maximum(begin, split_lo), jnp.minimum(end, split_hi)
        carry = lax.fori_loop(
            begin, jnp.maximum(begin, end), functools.partial(step, masked=masked), carry
        )
    acc, m, denom, bad = carry
    # The unmasked blocks let a visible non-finite value flow on into acc; catch it here.
    bad = jnp.maximum(bad, (~jnp.isfinite(denom)).astype(jnp.int32))
    bad = jnp.maximum(bad, _any(~jnp.isfinite(acc), axis=1)) > 0

    if k_splits == 1:
        (out_ref,) = refs
        positive = denom > 0  # 0: no visible key (padding), output zeros
        out = jnp.where(positive[:, None], acc / jnp.where(positive, denom, 1.0)[:, None], 0.0)
        out = jnp.where(bad[:, None], jnp.nan, out).reshape(rows, group_pad, head_dim)

        @pl.when(length > 0)
        def _():
            plgpu.store(
                out_ref.at[pl.ds(start, rows), head, :, :],
                out.astype(out_ref.dtype),
                mask=row_ok[:, None, None],
            )

    else:  # Partial results of this split; a NaN denominator marks a poisoned query.
        acc_ref, m_ref, denom_ref = refs

        @pl.when(length > 0)
        def _():
            part = (split, tile, slice(None), head)
            plgpu.store(acc_ref.at[part], acc.reshape(rows, group_pad, head_dim))
            plgpu.store(m_ref.at[part], m.reshape(rows, group_pad))
            plgpu.store(denom_ref.at[part], jnp.where(bad, jnp.nan, denom).reshape(rows, group_pad))


def _combine_splits(acc, m, denom):
    """Merges split partials: acc [K, ...rows, D], m and denom [K, ...rows] (running max
    and softmax denominator, log2 units) -> [...rows, D] float32.

    Splits with no keys have m = mask value and denom = 0, so their weight is 0; a NaN
    denominator (a poisoned query) poisons the result; no key at all gives 0.
    """
    m_all = jnp.max(m, axis=0)
    weight = jnp.exp2(m - m_all[None])
    denom_all = jnp.sum(weight * denom, axis=0)
    acc_all = jnp.sum(weight[..., None] * acc, axis=0)
    positive = denom_all > 0
    out = jnp.where(
        positive[..., None], acc_all / jnp.where(positive, denom_all, 1.0)[..., None], 0.0
    )
    return jnp.where(jnp.isnan(denom_all)[..., None], jnp.nan, out)


def _default_k_splits(num_tiles: int, num_kv_heads: int, max_key_blocks: int) -> int:
    """Enough splits for about ``DECODE_TARGET_PROGRAMS`` programs, one key block each at
    least: few long sequences spread over the GPU, many fill it without splitting."""
    wanted = max(1, DECODE_TARGET_PROGRAMS // (num_tiles * num_kv_heads))
    return max(1, min(wanted, max_key_blocks))


def _attend(
    tiles: QueryTiles,
    q_pos,
    page_tables,
    q,
    k_flat,
    v_flat,
    previous,
    *,
    rows: int,
    group: int,
    page_size: int,
    window: int | None,
    k_splits: int,
    blocks: AttentionBlocks,
    interpret: bool,
    name: str,
):
    """One kernel launch over one tile class. Returns the [T, Hkv, G, D] output with this
    class's rows written (into ``previous``, if given, in place), or, with k_splits > 1,
    the f32 partials (acc [k, W, R, Hkv, G, D], m and denom [k, W, R, Hkv, G])."""
    num_rows, num_kv_heads, group_pad, head_dim = q.shape
    num_tiles = tiles.seg.shape[0]
    kernel = functools.partial(
        _attention_kernel,
        rows=rows,
        group=group,
        block_k=blocks.block_k,
        page_size=page_size,
        window=window,
        k_splits=k_splits,
        aliased=previous is not None,
    )
    if k_splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, k_flat.dtype)
    else:
        part = (k_splits, num_tiles, rows, num_kv_heads, group_pad)
        out_shape = (
            jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        )
    operands = (*tiles, q_pos, page_tables, q, k_flat, v_flat)
    # A tile reads and writes ``rows`` rows from its start, which may pass the last row.
    rows_reach = tile_reach(num_rows, rows)
    row_spec = covering(q.shape, (rows_reach, *q.shape[1:]))
    in_specs = [*[pl.no_block_spec] * len(tiles), covering(q_pos.shape, (rows_reach,))]
    in_specs += [pl.no_block_spec, row_spec, pl.no_block_spec, pl.no_block_spec]
    out_specs = row_spec if k_splits == 1 else [pl.no_block_spec] * 3
    aliases = {}
    if previous is not None:
        aliases = {len(operands): 0}
        operands = (*operands, previous)
        in_specs.append(row_spec)
    return pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, k_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name=name,
    )(*operands)


def _check_blocks(blocks: AttentionBlocks, name: str) -> None:
    for field in ("block_m", "block_k"):
        value = getattr(blocks, field)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}.{field} must be a power of two >= 16, got {value}")
    if blocks.k_splits is not None and blocks.k_splits < 1:
        raise ValueError(f"{name}.k_splits must be >= 1 or None, got {blocks.k_splits}")


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "interpret", "decode_blocks", "prefill_blocks"),
)
def paged_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    page_tables: jax.Array,
    q_pos: jax.Array,
    q_seg: jax.Array,
    *,
    sliding_window: int | None = None,
    interpret: bool | None = None,
    decode_blocks: AttentionBlocks = DECODE_BLOCKS,
    prefill_blocks: AttentionBlocks = PREFILL_BLOCKS,
) -> jax.Array:
    """Causal (optionally sliding-window) GQA attention of packed queries over their
    sequences' cached pages; equals ``loqjax.attention.paged_attention`` on every row with
    ``q_seg >= 0``.

    Query i of sequence s sees the keys of s at positions p with ``p <= q_pos[i]`` (and
    ``q_pos[i] - p < sliding_window``), the key at p being in page
    ``page_tables[s, p // page_size]`` at offset ``p % page_size``. Query head h reads kv
    head ``h // (Hq // Hkv)``. Scores and softmax are float32.

    Args:
      q: [T, Hq, D] queries, RoPE applied; their own keys and values already in the pools.
        D a power of two >= 16; Hq a multiple of Hkv.
      k_pool, v_pool: [P, page_size, Hkv, D] one layer's pools.
      page_tables: int32 [S, M], the pages of sequence s in position order; entries past
        its last needed page may be any valid page id.
      q_pos: int32 [T], each query's position in its sequence, < M * page_size.
      q_seg: int32 [T] in [-1, S), each query's sequence; -1 for padding. The rows of a
        sequence must be contiguous.
      sliding_window: static window length, or None.
      interpret: run the kernels interpreted (default: unless on a GPU).
      decode_blocks, prefill_blocks: static tiling of the two kernels.

    Returns:
      [T, Hq, D] in the pools' dtype; zeros on padding rows, NaN for a query that sees a
      non-finite key or value or has one itself.
    """
    num_rows, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pool.shape
    num_seqs, max_pages = page_tables.shape
    if k_pool.shape != v_pool.shape or k_pool.shape[-1] != head_dim:
        raise ValueError(f"pools {k_pool.shape}, {v_pool.shape} do not match q {q.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if q_pos.shape != (num_rows,) or q_seg.shape != (num_rows,):
        raise ValueError(f"q_pos {q_pos.shape} and q_seg {q_seg.shape} must be [{num_rows}]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    _check_blocks(decode_blocks, "decode_blocks")
    _check_blocks(prefill_blocks, "prefill_blocks")
    interpret = default_interpret() if interpret is None else interpret

    group = num_heads // num_kv_heads
    group_pad = pl.next_power_of_2(group)
    q = q.reshape(num_rows, num_kv_heads, group, head_dim)
    if group_pad != group:  # a power-of-two M side; the extra heads are masked
        q = jnp.pad(q, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    # Slot-major views of the pools (free reshapes): row p * page_size + o is page p's o.
    k_flat = k_pool.reshape(num_pages * page_size, num_kv_heads, head_dim)
    v_flat = v_pool.reshape(num_pages * page_size, num_kv_heads, head_dim)
    small_rows = max(1, decode_blocks.block_m // group_pad)
    large_rows = max(1, prefill_blocks.block_m // group_pad)
    plan = plan_query_tiles(q_seg, num_seqs, large_rows, small_rows)
    q_pos = q_pos.astype(jnp.int32)
    page_tables = page_tables.astype(jnp.int32)
    common = dict(group=group, page_size=page_size, window=sliding_window, interpret=interpret)
    max_positions = max_pages * page_size

    out = None
    for tiles, blocks, rows, in_class, name in (
        (plan.small, decode_blocks, min(small_rows, large_rows), plan.row_small == 1, "decode"),
        (plan.large, prefill_blocks, large_rows, plan.row_small == 0, "prefill"),
    ):
        k_splits = blocks.k_splits
        if k_splits is None:
            num_tiles = num_seqs if name == "decode" else pl.cdiv(num_rows, rows)
            k_splits = _default_k_splits(
                num_tiles, num_kv_heads, pl.cdiv(max_positions, blocks.block_k)
            )
        result = _attend(
            tiles,
            q_pos,
            page_tables,
            q,
            k_flat,
            v_flat,
            out if k_splits == 1 else None,
            rows=rows,
            k_splits=k_splits,
            blocks=blocks,
            name=f"paged_attention_{name}",
            **common,
        )
        if k_splits == 1:
            out = result
            continue
        per_tile = _combine_splits(*result).astype(k_pool.dtype)  # [W, R, Hkv, G, D]
        per_row = per_tile[plan.row_tile, plan.row_offset]
        out = per_row if out is None else jnp.where(in_class[:, None, None, None], per_row, out)
    return out[:, :, :group].reshape(num_rows, num_heads, head_dim)
