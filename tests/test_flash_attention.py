"""Packed flash attention against ``loqjax.attention.reference_attention`` and its autodiff.

The CPU tests interpret the kernels at small, fixed shapes (one compile per config, shared
through module-level jitted functions); hypothesis varies the segment layout, which is data.
The interpreter fills every output with NaN first, so "finite and equal to the reference"
also proves that every output element was written. The ``gpu``-marked twins run the same
checks compiled by Triton at a realistic size: ``pytest -m gpu tests/test_flash_attention.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loqjax.attention import attention_mask, reference_attention
from pallas_kernels import packed_attention
from pallas_kernels.flash_attention import (
    _key_block_bounds,
    _layout,
    _query_block_bounds,
    packed_layout_ok,
)

ON_GPU = jax.default_backend() == "gpu"
NUM_ROWS, NUM_HEADS = 88, 4  # 88: no block size divides it, so partial blocks run
# Small blocks, different per kernel, so every kernel's bounds matter and blocks straddle
# segments; rows P = 96 after padding.
SMALL_BLOCKS = (
    ("block_q", 32),
    ("block_k", 16),
    ("block_q_dq", 16),
    ("block_k_dq", 32),
    ("block_q_dkv", 32),
    ("block_k_dkv", 16),
)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# (dtype, num_kv_heads, sliding_window, head_dim): GQA ratios 1, 2 and 4, with and without
# a window, both dtypes, both head dims; each config is one compile of the kernels and one
# of the reference (the compiles dominate the runtime, so there are few).
CONFIGS = [
    (jnp.float32, 4, None, 16),
    (jnp.float32, 2, 7, 32),
    (jnp.bfloat16, 1, 20, 16),
]
NAN_CONFIG = CONFIGS[1]
GPU_ROWS, GPU_HEADS, GPU_KV_HEADS, GPU_HEAD_DIM = 1024, 8, 2, 128


def config_id(config):
    dtype, kv_heads, window, head_dim = config
    return f"{jnp.dtype(dtype).name}-g{NUM_HEADS // kv_heads}-w{window}-d{head_dim}"


@st.composite
def layouts(draw, num_rows=NUM_ROWS, lengths=(1, 1, 2, 3, 5, 7, 16, 17, 31, 40, 88)):
    """(positions, segment_ids) int32 [num_rows]: segments of the drawn lengths (incl. 1,
    many short, one as long as the batch), not block-aligned, with distinct arbitrary ids
    and start positions, padding runs (segment -1, junk positions) between segments now
    and then and a padding tail of any length."""
    pieces = draw(
        st.lists(
            st.tuples(st.sampled_from(lengths), st.sampled_from([False] * 5 + [True])),
            min_size=1,
            max_size=24,
        )
    )
    ids = draw(st.permutations(range(100)))
    tail = draw(st.sampled_from([0, 0, 1, 9, 30]))
    segment_ids = np.full(num_rows, -1, np.int32)
    junk = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    positions = junk.integers(0, 50, num_rows, dtype=np.int32)  # padding rows keep these
    row = 0
    for i, (length, padding) in enumerate(pieces):
        length = min(length, num_rows - tail - row)
        if length <= 0:
            break
        if not padding:
            segment_ids[row : row + length] = ids[i]
            positions[row : row + length] = draw(st.integers(0, 9)) + np.arange(length)
        row += length
    return positions, segment_ids


def make_operands(seed, num_rows, num_heads, num_kv_heads, head_dim, dtype):
    """q, k, v and the output cotangent, standard normal (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    shapes = [(num_heads,), (num_kv_heads,), (num_kv_heads,), (num_heads,)]
    return tuple(
        jnp.asarray(rng.standard_normal((num_rows, *heads, head_dim)), dtype) for heads in shapes
    )


TRACES = []  # one entry per trace of kernel_and_grads: compiles are counted by the tests


@functools.partial(jax.jit, static_argnames=("window", "blocks"))
def kernel_and_grads(q, k, v, positions, segment_ids, cotangent, *, window, blocks):
    TRACES.append(None)

    def attend(q, k, v):
        return packed_attention(
            q, k, v, positions, segment_ids, sliding_window=window, **dict(blocks)
        )

    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


@functools.partial(jax.jit, static_argnames=("window",))
def reference_and_grads(q, k, v, positions, segment_ids, cotangent, *, window):
    """The reference in float32 with a zero cotangent on padding rows (their outputs and
    cotangents are free), so padding rows' gradients are zero as the kernels' must be."""
    q, k, v, cotangent = (x.astype(jnp.float32) for x in (q, k, v, cotangent))
    cotangent = jnp.where((segment_ids >= 0)[:, None, None], cotangent, 0.0)

    def attend(q, k, v):
        return reference_attention(q, k, v, positions, positions, segment_ids, segment_ids, window)

    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(cotangent)


def rel_err(got, want) -> float:
    """Relative error in norm. The values are of unit scale, so an RMS below 0.1 counts
    as 0.1: a batch of one-row segments has dq = 0 up to rounding, say."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    floor = 0.1 * np.sqrt(max(want.size, 1))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor))


def run_both(
    config, layout, seed, *, num_rows=NUM_ROWS, num_heads=NUM_HEADS, blocks=SMALL_BLOCKS, bad=None
):
    """Kernel and reference outputs and (dq, dk, dv), on operands made bad by ``bad``."""
    dtype, num_kv_heads, window, head_dim = config
    positions, segment_ids = layout
    q, k, v, cotangent = make_operands(seed, num_rows, num_heads, num_kv_heads, head_dim, dtype)
    if bad is not None:
        q, k, v = bad(q, k, v)
    args = (q, k, v, positions, segment_ids, cotangent)
    return (
        kernel_and_grads(*args, window=window, blocks=blocks),
        reference_and_grads(*args, window=window),
    )


def check_against_reference(config, layout, seed, **kwargs):
    dtype = config[0]
    (out, grads), (out_ref, grads_ref) = run_both(config, layout, seed, **kwargs)
    assert out.dtype == dtype
    out, out_ref = np.asarray(out, np.float32), np.asarray(out_ref)
    segment = layout[1] >= 0
    tol = TOLERANCE[dtype]
    assert not out[~segment].any(), "padding rows must be zero"
    # The reference's padding rows attend among themselves: compare segment rows only.
    for name, got, want in [
        ("out", out[segment], out_ref[segment]),
        ("dq", grads[0], grads_ref[0]),
        ("dk", grads[1], grads_ref[1]),
        ("dv", grads[2], grads_ref[2]),
    ]:
        assert name == "out" or got.dtype == dtype, name
        got = np.asarray(got, np.float32)
        assert np.isfinite(got).all(), f"{name} has unwritten or non-finite elements"
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@settings(max_examples=10, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1))
def test_forward_and_gradients_match_reference(config, layout, seed):
    check_against_reference(config, layout, seed)


@pytest.mark.parametrize("splits", [1, 2])
@settings(max_examples=3, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1))
def test_dk_dv_programs_sharing_the_group_match_reference(splits, layout, seed):
    """A group of 4 q heads over 1 or 2 dk/dv programs (the default, 4, runs above)."""
    blocks = (*SMALL_BLOCKS, ("dkv_head_splits", splits))
    check_against_reference((jnp.float32, 1, 7, 16), layout, seed, blocks=blocks)


@pytest.mark.parametrize(
    "layout",
    [
        (np.arange(NUM_ROWS), np.zeros(NUM_ROWS)),  # one segment: dense causal
        (np.zeros(NUM_ROWS), np.arange(NUM_ROWS)),  # every row alone
        (np.zeros(NUM_ROWS), np.full(NUM_ROWS, -1)),  # all padding
        (np.arange(NUM_ROWS) + 1000, np.repeat([5, -1], [80, 8])),  # late start, padding tail
    ],
    ids=["dense", "singletons", "all-padding", "offset"],
)
def test_edge_layouts(layout):
    layout = tuple(np.asarray(x, np.int32) for x in layout)
    for config in (CONFIGS[0], CONFIGS[1]):
        check_against_reference(config, layout, seed=0)


def test_one_compile_serves_every_layout():
    traces = len(TRACES)
    for lengths in ([88], [1] * 40 + [48], [17, 3, 68]):
        segment_ids = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
        positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
        check_against_reference(CONFIGS[0], (positions, segment_ids), seed=1)
    assert len(TRACES) - traces <= 1  # only the first call may compile (if no test did)


# --- NaN isolation ---

# Segments of 5 to 9 rows: several share every kernel block.
SHORT = layouts(lengths=(5, 6, 7, 9))
SHORT_LIVE = SHORT.filter(lambda layout: (layout[1] >= 0).any())  # a segment row at least


@st.composite
def bad_entries(draw, num_heads=NUM_HEADS, num_kv_heads=NAN_CONFIG[1], head_dim=NAN_CONFIG[3]):
    """1 to 3 (operand, row, head, dim, value) with a non-finite value."""
    entry = st.tuples(
        st.sampled_from("qkv"),
        st.integers(0, NUM_ROWS - 1),
        st.integers(0, num_heads - 1),
        st.integers(0, head_dim - 1),
        st.sampled_from([np.nan, np.inf, -np.inf]),
    )
    entries = draw(st.lists(entry, min_size=1, max_size=3))
    return [
        (op, row, head if op == "q" else head % num_kv_heads, d, x)
        for op, row, head, d, x in entries
    ]


def corrupt(entries):
    def bad(q, k, v):
        ops = {name: np.array(x) for name, x in dict(q=q, k=k, v=v).items()}
        for op, row, head, dim, value in entries:
            ops[op][row, head, dim] = value
        return tuple(jnp.asarray(ops[name]) for name in "qkv")

    return bad


@settings(max_examples=12, deadline=None)
@given(layout=SHORT, entries=bad_entries(), seed=st.integers(0, 2**31 - 1))
def test_non_finite_values_stay_in_their_segment(layout, entries, seed):
    """Outputs are NaN exactly where the reference's are; every other output and every
    gradient of every other segment is bit-identical to the run without the bad values;
    the gradients match the reference's (which are finite: 0 for non-finite inputs)."""
    config = NAN_CONFIG
    (out, grads), (out_ref, grads_ref) = run_both(config, layout, seed, bad=corrupt(entries))
    (clean_out, clean_grads), _ = run_both(config, layout, seed)
    out, out_ref, clean_out = (np.asarray(x) for x in (out, out_ref, clean_out))
    segment_ids = layout[1]
    poisoned = np.isnan(out_ref) & (segment_ids >= 0)[:, None, None]
    np.testing.assert_array_equal(np.isnan(out), poisoned)
    np.testing.assert_array_equal(out[~poisoned], clean_out[~poisoned])
    fine = ~poisoned & (segment_ids >= 0)[:, None, None]  # the reference's padding differs
    assert rel_err(out[fine], out_ref[fine]) < TOLERANCE[config[0]]

    bad_segments = {segment_ids[row] for _, row, *_ in entries}
    others = ~np.isin(segment_ids, list(bad_segments))
    for name, got, clean, want in zip("qkv", grads, clean_grads, grads_ref, strict=True):
        got = np.asarray(got)
        assert np.isfinite(got).all(), f"d{name} is not finite"
        np.testing.assert_array_equal(got[others], np.asarray(clean)[others], err_msg=f"d{name}")
        assert rel_err(got, want) < TOLERANCE[config[0]], f"d{name}"


def test_nan_cotangent_on_dead_rows_is_dropped():
    """Poisoned and padding queries take no gradient: a NaN cotangent there (what a
    later layer sends back for rows it got NaN in) changes nothing."""
    config = NAN_CONFIG
    dtype, num_kv_heads, window, head_dim = config
    segment_ids = np.repeat(np.array([0, 1, 2, -1], np.int32), [30, 20, 30, 8])
    positions = np.concatenate([np.arange(30), np.arange(20), np.arange(30), np.zeros(8)])
    positions = positions.astype(np.int32)
    q, k, v, cotangent = make_operands(3, NUM_ROWS, NUM_HEADS, num_kv_heads, head_dim, dtype)
    blocks = SMALL_BLOCKS
    args = (positions, segment_ids)
    bad_v = v.at[35, 0, 1].set(np.nan)  # poisons segment 1 from row 35, kv head 0's q heads
    out, grads = kernel_and_grads(q, k, bad_v, *args, cotangent, window=window, blocks=blocks)
    dead = np.isnan(np.asarray(out)) | (segment_ids < 0)[:, None, None]
    assert dead[35:50].any() and not dead[:35].any()
    nan_cotangent = jnp.where(dead, np.nan, cotangent)
    _, nan_grads = kernel_and_grads(q, k, bad_v, *args, nan_cotangent, window=window, blocks=blocks)
    for got, want in zip(nan_grads, grads, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@st.composite
def live_bad_cotangents(draw, layout):
    """1 to 3 (row, q head, dim, value): a non-finite cotangent on a segment row."""
    live = np.flatnonzero(layout[1] >= 0)
    entry = st.tuples(
        st.sampled_from(live),
        st.integers(0, NUM_HEADS - 1),
        st.integers(0, NAN_CONFIG[3] - 1),
        st.sampled_from([np.nan, np.inf, -np.inf]),
    )
    return draw(st.lists(entry, min_size=1, max_size=3))


@settings(max_examples=8, deadline=None)
@given(data=st.data(), layout=SHORT_LIVE, seed=st.integers(0, 2**31 - 1))
def test_nan_cotangent_on_a_live_row_stays_in_its_segment(data, layout, seed):
    """A non-finite cotangent on a live query row (its later layers overflowed) makes
    exactly the gradients the reference's makes non-finite NaN: that row's dq, the dk/dv
    rows of the keys it sees; every other gradient is bit-identical to the run with a
    zero cotangent there, so other segments (other adapters' sequences) are untouched."""
    entries = data.draw(live_bad_cotangents(layout))
    dtype, num_kv_heads, window, head_dim = NAN_CONFIG
    positions, segment_ids = layout
    q, k, v, cotangent = make_operands(seed, NUM_ROWS, NUM_HEADS, num_kv_heads, head_dim, dtype)
    bad, zeroed = np.array(cotangent), np.array(cotangent)
    for row, head, dim, value in entries:
        bad[row, head, dim] = value
        zeroed[row, head, dim] = 0.0
    args = (q, k, v, positions, segment_ids)
    _, grads = kernel_and_grads(*args, jnp.asarray(bad), window=window, blocks=SMALL_BLOCKS)
    _, clean = kernel_and_grads(*args, jnp.asarray(zeroed), window=window, blocks=SMALL_BLOCKS)
    _, grads_ref = reference_and_grads(*args, jnp.asarray(bad), window=window)

    bad_rows = np.zeros((NUM_ROWS, NUM_HEADS), bool)
    for row, head, *_ in entries:
        bad_rows[row, head] = True
    group = NUM_HEADS // num_kv_heads
    seen = visible_pairs(positions, segment_ids, window).T.astype(int) @ bad_rows.reshape(
        NUM_ROWS, num_kv_heads, group
    ).any(axis=-1)
    expected = [bad_rows, seen > 0, seen > 0]  # NaN rows of dq, dk, dv
    for name, got, zero, want, nan_rows in zip(
        "qkv", grads, clean, grads_ref, expected, strict=True
    ):
        got, zero, want = (np.asarray(x, np.float32) for x in (got, zero, want))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"d{name}")
        np.testing.assert_array_equal(np.isnan(got).any(axis=-1), nan_rows, err_msg=f"d{name}")
        np.testing.assert_array_equal(got[~nan_rows], zero[~nan_rows], err_msg=f"d{name}")
        assert rel_err(got[~nan_rows], want[~nan_rows]) < TOLERANCE[dtype], f"d{name}"


@settings(max_examples=6, deadline=None)
@given(data=st.data(), layout=SHORT_LIVE, seed=st.integers(0, 2**31 - 1))
def test_overflow_inside_one_segment_stays_there(data, layout, seed):
    """Finite but huge q, k, v in one segment (an adapter diverging): its scores overflow
    to infinity, its softmax to NaN. Every other segment's outputs and gradients are
    bit-identical to the run without it (kernel), and the reference's are as unaffected."""
    dtype, num_kv_heads, window, head_dim = NAN_CONFIG
    positions, segment_ids = layout
    bad_segment = data.draw(st.sampled_from(sorted(set(segment_ids[segment_ids >= 0]))))
    rows = segment_ids == bad_segment
    q, k, v, cotangent = make_operands(seed, NUM_ROWS, NUM_HEADS, num_kv_heads, head_dim, dtype)
    huge = [
        jnp.where(rows[:, None, None], x * scale, x)
        for x, scale in zip((q, k, v), (1e20, 1e20, 1e37), strict=True)
    ]
    args = (positions, segment_ids, cotangent)
    out, grads = kernel_and_grads(*huge, *args, window=window, blocks=SMALL_BLOCKS)
    clean_out, clean_grads = kernel_and_grads(q, k, v, *args, window=window, blocks=SMALL_BLOCKS)
    out_ref, grads_ref = reference_and_grads(*huge, *args, window=window)
    clean_ref, clean_grads_ref = reference_and_grads(q, k, v, *args, window=window)
    others = ~rows & (segment_ids >= 0)
    assert not np.isfinite(np.asarray(out_ref)[rows]).all()  # the overflow happened
    for got, want in [(out, clean_out), *zip(grads, clean_grads, strict=True)]:
        np.testing.assert_array_equal(np.asarray(got)[others], np.asarray(want)[others])
    for got, want in [(out_ref, clean_ref), *zip(grads_ref, clean_grads_ref, strict=True)]:
        np.testing.assert_array_equal(np.asarray(got)[others], np.asarray(want)[others])


# --- block bounds: what the kernels visit ---


@functools.partial(jax.jit, static_argnames=("kind", "num_rows", "padded", "blocks", "window"))
def block_bounds(positions, segment_ids, *, kind, num_rows, padded, blocks, window):
    """int32 [4, n]: the kernels' bounds (``kind``: "query" or "key") on a layout."""
    lay = _layout(positions, segment_ids, padded)
    bounds_fn = _query_block_bounds if kind == "query" else _key_block_bounds
    return bounds_fn(lay, num_rows, *blocks, window)


def visible_pairs(positions, segment_ids, window):
    mask = np.asarray(attention_mask(positions, positions, segment_ids, segment_ids, window))
    return mask & (segment_ids >= 0)[:, None]


@settings(max_examples=25, deadline=None)
@given(
    layout=layouts(),
    # (block_q, block_k, window): few combinations, as each is a compile.
    blocks=st.sampled_from([(16, 16, None), (32, 16, 5), (16, 32, 1)]),
)
def test_block_bounds_cover_visible_pairs_and_full_blocks_need_no_mask(layout, blocks):
    block_q, block_k, window = blocks
    positions, segment_ids = layout
    assert bool(packed_layout_ok(positions, segment_ids))
    padded = 128
    bounds_of = functools.partial(
        block_bounds,
        positions,
        segment_ids,
        num_rows=NUM_ROWS,
        padded=padded,
        blocks=(block_q, block_k),
        window=window,
    )
    mask = np.zeros((padded, padded), bool)
    mask[:NUM_ROWS, :NUM_ROWS] = visible_pairs(positions, segment_ids, window)
    segment = np.zeros(padded, bool)
    segment[:NUM_ROWS] = segment_ids >= 0

    def blocks(rows_block, cols_block, transpose):
        """[n_rows, n_cols, rows_block, cols_block] of the mask (rows: the outer blocks)."""
        m = mask.T if transpose else mask
        m = m[: -(-NUM_ROWS // rows_block) * rows_block]
        return m.reshape(len(m) // rows_block, rows_block, -1, cols_block).transpose(0, 2, 1, 3)

    for bounds, rows_block, cols_block, transpose in [
        (bounds_of(kind="query"), block_q, block_k, False),
        (bounds_of(kind="key"), block_k, block_q, True),
    ]:
        bounds = np.asarray(bounds)
        tiles = blocks(rows_block, cols_block, transpose)
        for i, (begin, full_begin, full_end, end) in enumerate(bounds.T):
            assert begin <= full_begin <= full_end <= end
            touched = np.flatnonzero(tiles[i].any(axis=(1, 2)))
            assert ((touched >= begin) & (touched < end)).all(), (i, touched, bounds[:, i])
            if touched.size:  # the range is tight: it starts and ends at touched blocks
                assert begin == touched[0] and end == touched[-1] + 1
            # Full blocks (no mask): every segment row of the outer block sees (key
            # blocks: is seen by) every row of the inner block, so none is padding or
            # past T either.
            outer = segment[i * rows_block : (i + 1) * rows_block]
            for j in range(full_begin, full_end):
                assert tiles[i, j][outer].all(), (i, j, bounds[:, i])


@pytest.mark.parametrize("window", [None, 256])
def test_packed_batch_skips_blocks(window):
    """8 sequences of 1024 rows in T = 8192 visit exactly 8 times the blocks of one
    sequence alone: ~1/8 of a dense causal kernel's (1/8 x 72/65 at these blocks). With
    a window of 256 the window bounds both."""

    def visited(lengths, kind, blocks):
        segment_ids = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
        positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
        num_rows = len(segment_ids)
        bounds = block_bounds(
            positions,
            segment_ids,
            kind=kind,
            num_rows=num_rows,
            padded=num_rows,
            blocks=blocks,
            window=window,
        )
        begin, full_begin, full_end, end = np.asarray(bounds, np.int64)
        return (end - begin).sum(), ((full_begin - begin) + (end - full_end)).sum()

    # The forward's default blocks (the dq kernel's bounds are the same function) and
    # the dk/dv kernel's.
    for kind, blocks in [("query", (128, 64)), ("key", (64, 64))]:
        packed, packed_masked = visited([1024] * 8, kind, blocks)
        dense, _ = visited([8192], kind, blocks)
        alone, _ = visited([1024], kind, blocks) if window is None else (packed / 8, None)
        assert packed == 8 * alone
        if window is None:
            assert packed / dense < 0.14, packed / dense
            assert packed_masked <= 0.25 * packed  # most visited blocks skip the mask


def test_packed_layout_ok():
    ok = (np.array([3, 4, 5, 0, 1, 0, 0]), np.array([2, 2, 2, 0, 0, -1, -1]))
    assert bool(packed_layout_ok(*ok))
    assert not bool(packed_layout_ok(np.array([0, 1, 3]), np.array([0, 0, 0])))  # gap
    assert not bool(packed_layout_ok(np.array([0, 1, 0]), np.array([0, 1, 0])))  # split


def test_rejects_bad_arguments():
    q = jnp.zeros((16, 4, 16))
    k = jnp.zeros((16, 3, 16))
    rows = jnp.zeros(16, jnp.int32)
    with pytest.raises(ValueError, match="multiple"):
        packed_attention(q, k, k, rows, rows)
    with pytest.raises(ValueError, match="power of two"):
        packed_attention(q, q, q, rows, rows, block_q=48)
    with pytest.raises(ValueError, match="head_dim"):
        packed_attention(q[..., :8], q[..., :8], q[..., :8], rows, rows)
    with pytest.raises(ValueError, match="dkv_head_splits"):
        packed_attention(q, q[:, :2], q[:, :2], rows, rows, dkv_head_splits=3)


# --- Triton: lowering on any machine, the same checks compiled on a GPU ---


@pytest.mark.parametrize("head_dim, window", [(128, None), (64, 256)])
def test_kernels_lower_to_triton(cuda_lowering, head_dim, window):
    """The Pallas-to-Triton lowering (plain Python, no GPU needed) accepts all three kernels
    at their default blocks. Compiling the Triton IR and running it needs a GPU."""
    rows, heads, kv_heads = 1024, 8, 2

    def attend_and_grads(q, k, v, positions, segment_ids, cotangent):
        def attend(q, k, v):
            return packed_attention(
                q, k, v, positions, segment_ids, sliding_window=window, interpret=False
            )

        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(cotangent)

    q = jax.ShapeDtypeStruct((rows, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((rows, kv_heads, head_dim), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((rows,), jnp.int32)
    lowered = jax.jit(attend_and_grads).trace(q, kv, kv, ids, ids, q)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    for kernel in ("packed_attention_fwd", "packed_attention_dq", "packed_attention_dkv"):
        assert f'name = "{kernel}"' in text, kernel


# --- the same checks compiled by Triton on a GPU ---

GPU_CONFIGS = [
    (jnp.bfloat16, GPU_KV_HEADS, None, GPU_HEAD_DIM),
    (jnp.bfloat16, GPU_KV_HEADS, 256, GPU_HEAD_DIM),
    (jnp.float32, GPU_KV_HEADS, None, GPU_HEAD_DIM),
]
GPU_LAYOUTS = layouts(num_rows=GPU_ROWS, lengths=(1, 7, 64, 100, 129, 300, 513, 1024))
DEFAULT_BLOCKS = ()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=config_id)
@settings(max_examples=10, deadline=None)
@given(layout=GPU_LAYOUTS, seed=st.integers(0, 2**31 - 1))
def test_compiled_kernels_match_reference_on_gpu(config, layout, seed):
    check_against_reference(
        config, layout, seed, num_rows=GPU_ROWS, num_heads=GPU_HEADS, blocks=DEFAULT_BLOCKS
    )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a GPU")
@settings(max_examples=5, deadline=None)
@given(
    layout=layouts(num_rows=GPU_ROWS, lengths=(5, 9, 70, 200)),
    entries=bad_entries(num_heads=GPU_HEADS, num_kv_heads=GPU_KV_HEADS, head_dim=GPU_HEAD_DIM),
)
def test_compiled_non_finite_isolation_on_gpu(layout, entries):
    config = GPU_CONFIGS[0]
    entries = [(op, row * GPU_ROWS // NUM_ROWS, *rest) for op, row, *rest in entries]
    kwargs = dict(num_rows=GPU_ROWS, num_heads=GPU_HEADS, blocks=DEFAULT_BLOCKS)
    (out, grads), (out_ref, _) = run_both(config, layout, 0, bad=corrupt(entries), **kwargs)
    (clean_out, clean_grads), _ = run_both(config, layout, 0, **kwargs)
    segment_ids = layout[1]
    poisoned = np.isnan(np.asarray(out_ref)) & (segment_ids >= 0)[:, None, None]
    out = np.asarray(out, np.float32)
    np.testing.assert_array_equal(np.isnan(out), poisoned)
    np.testing.assert_array_equal(out[~poisoned], np.asarray(clean_out, np.float32)[~poisoned])
    others = ~np.isin(segment_ids, [segment_ids[row] for _, row, *_ in entries])
    for got, clean in zip(grads, clean_grads, strict=True):
        got = np.asarray(got, np.float32)
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got[others], np.asarray(clean, np.float32)[others])
