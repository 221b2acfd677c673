"""SMLM kernels against the plain-jnp reference and its autodiff, in interpret mode.

Shapes are fixed per test (one compile each), as in the product, where batch
capacity is static; hypothesis varies the segment layout, which is data. Off
GPU the kernels run interpreted, and the interpreter fills every output buffer
with NaN first, so "matches the reference and is finite" also proves that every
output element was written. ``NUM_ROWS`` is within ``SMALL_BATCH_ROWS``, so
``smlm`` runs its small-batch forward here; ``LARGE_ROWS`` covers the two-kernel one
(tests/test_lora_split.py tests the small-batch kernels and ``smlm_group`` further).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl

from pallas_kernels import (
    SMALL_BATCH_ROWS,
    plan_row_tiles,
    plan_slot_chunks,
    segment_expand,
    segment_outer,
    segment_shrink,
    smlm,
    smlm_reference,
    token_slots,
)

from smlm_cases import (
    NUM_ROWS,
    NUM_SLOTS,
    SEGMENT_LENGTHS,
    TOLERANCE,
    layouts,
    rel_err,
)

# (d_in, rank, d_out): a rank below the 16-wide rank block, and sizes that are
# not multiples of the column blocks, so every masked path runs.
SHAPES = [(32, 8, 48), (40, 20, 24)]


def make_operands(seed, d_in, rank, d_out, dtype, num_rows=NUM_ROWS):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (num_rows, d_in))
    a = jax.random.normal(ks[1], (NUM_SLOTS, d_in, rank)) / np.sqrt(d_in)
    b = jax.random.normal(ks[2], (NUM_SLOTS, rank, d_out)) / np.sqrt(rank)
    base = jax.random.normal(ks[3], (num_rows, d_out))
    cotangent = jax.random.normal(ks[4], (num_rows, d_out))
    scale = jax.random.uniform(ks[5], (NUM_SLOTS,), minval=0.5, maxval=2.0)
    return tuple(v.astype(dtype) for v in (x, a, b, base, cotangent)) + (scale,)


@functools.partial(jax.jit, static_argnames=("with_base", "op"))
def smlm_and_grads(x, a, b, base, cotangent, scale, ends, slots, grad_rows, with_base, op=smlm):
    """``op``'s output and VJP: the kernels (``smlm``), or ``smlm_reference`` with its own
    ``grad_rows`` (the path off GPU)."""

    def f(x, a, b, base):
        return op(x, a, b, scale, ends, slots, base if with_base else None, grad_rows)

    y, vjp = jax.vjp(f, x, a, b, base)
    return y, vjp(cotangent)


@functools.partial(jax.jit, static_argnames=("with_base",))
def reference_and_grads(x, a, b, base, cotangent, scale, ends, slots, grad_rows, with_base):
    """The reference in float32, differentiated by JAX, on the training rows only."""
    x, a, b, base, cotangent = (v.astype(jnp.float32) for v in (x, a, b, base, cotangent))
    train = (jnp.arange(x.shape[0]) < grad_rows)[:, None]

    def loss(x, a, b, base):
        y = smlm_reference(x, a, b, scale, ends, slots, base if with_base else None)
        return jnp.sum(jnp.where(train, y * cotangent, 0.0))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(x, a, b, base)
    y = smlm_reference(x, a, b, scale, ends, slots, base if with_base else None)
    return y, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@settings(max_examples=8, deadline=None)
@given(layout=layouts(), with_base=st.booleans())
def test_reference_path_matches_kernels(dtype, layout, with_base):
    """The plain-jnp path a model takes off GPU gives the kernels' outputs and gradients
    in the same dtypes, with the same row cut (``grad_rows``) and base cotangent."""
    ends, slots, grad_rows, seed = layout
    x, a, b, base, cotangent, scale = make_operands(seed, *SHAPES[0], dtype)
    args = (x, a, b, base, cotangent, scale, ends, slots, grad_rows)
    y, grads = smlm_and_grads(*args, with_base=with_base)
    y_ref, grads_ref = smlm_and_grads(*args, with_base=with_base, op=smlm_reference)
    for name, got, want in zip(
        ("y", "dx", "da", "db", "dbase"), (y, *grads), (y_ref, *grads_ref), strict=True
    ):
        assert want.dtype == got.dtype, name
        err = rel_err(want, got)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"
    assert not np.asarray(grads_ref[0], np.float32)[grad_rows:].any()


def test_reference_keeps_non_finite_values_to_their_slot_and_row():
    """A slot with an infinite weight, and a row with a NaN input, poison their own
    outputs and gradients only (the kernels read each row's own slot alone)."""
    x, a, b, base, cotangent, scale = make_operands(0, *SHAPES[0], jnp.float32)
    ends = jnp.array([10, 20, 30, NUM_ROWS] + [NUM_ROWS] * 4, jnp.int32)
    slots = jnp.array([0, 1, 2, 1] + [-1] * 4, jnp.int32)
    a = a.at[0, 3, 1].set(jnp.inf)
    x = x.at[25].set(jnp.nan)  # a row of slot 2
    args = (x, a, b, base, cotangent, scale, ends, slots, NUM_ROWS)
    y, (dx, da, db, _) = smlm_and_grads(*args, with_base=True, op=smlm_reference)
    bad_rows = np.zeros(NUM_ROWS, bool)
    bad_rows[:10] = bad_rows[25] = True
    finite = np.isfinite(np.asarray(y)).all(axis=1)
    np.testing.assert_array_equal(finite, ~bad_rows)
    assert np.isfinite(np.asarray(dx)[~bad_rows]).all()
    for slot in (1, 3, 4):  # 3 and 4 serve no row
        assert np.isfinite(np.asarray(da[slot])).all() and np.isfinite(np.asarray(db[slot])).all()


def test_interpreter_poisons_outputs():
    """The premise of the 'every element written' checks below."""
    out = pl.pallas_call(
        lambda x_ref, o_ref: None,
        out_shape=jax.ShapeDtypeStruct((4, 4), jnp.float32),
        interpret=True,
    )(jnp.ones(4))
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@settings(max_examples=8, deadline=None)
@given(layout=layouts(), with_base=st.booleans())
def test_smlm_forward_and_gradients_match_reference(shape, dtype, layout, with_base):
    check_against_reference(shape, dtype, layout, with_base)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@settings(max_examples=20, deadline=None)
@given(layout=layouts(), with_base=st.booleans())
def test_compiled_kernels_match_reference_on_gpu(dtype, layout, with_base):
    """The interpreted test above, on kernels compiled by Triton."""
    check_against_reference(SHAPES[1], dtype, layout, with_base)


# A batch above SMALL_BATCH_ROWS: the two-kernel forward (NUM_ROWS takes the small-batch one).
LARGE_ROWS = SMALL_BATCH_ROWS + 16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@settings(max_examples=4, deadline=None)
@given(
    layout=layouts(num_rows=LARGE_ROWS, segment_lengths=(*SEGMENT_LENGTHS, 120)),
    with_base=st.booleans(),
)
def test_smlm_large_batch_matches_reference(dtype, layout, with_base):
    check_against_reference(SHAPES[1], dtype, layout, with_base, num_rows=LARGE_ROWS)


@pytest.mark.parametrize(
    "num_rows, kernels",
    [
        (NUM_ROWS, {"smlm_split_shrink", "smlm_split_expand"}),
        (LARGE_ROWS, {"smlm_shrink", "smlm_expand"}),
    ],
)
def test_forward_path_by_batch_size(num_rows, kernels):
    """Small batches take the split-K group launches; large ones shrink then expand per
    projection."""
    x, a, b, base, _, scale = make_operands(0, *SHAPES[0], jnp.float32, num_rows)
    ends, slots = np.array([num_rows], np.int32), np.array([0], np.int32)
    jaxpr = str(jax.make_jaxpr(lambda x: smlm(x, a, b, scale, ends, slots, base))(x))
    names = {"smlm_split_shrink", "smlm_split_expand", "smlm_shrink", "smlm_expand"}
    assert {name for name in names if name in jaxpr} == kernels


def check_against_reference(shape, dtype, layout, with_base, num_rows=NUM_ROWS):
    ends, slots, grad_rows, seed = layout
    x, a, b, base, cotangent, scale = make_operands(seed, *shape, dtype, num_rows)
    args = (x, a, b, base, cotangent, scale, ends, slots, grad_rows)
    y, (dx, da, db, dbase) = smlm_and_grads(*args, with_base=with_base)
    y_ref, (dx_ref, da_ref, db_ref, dbase_ref) = reference_and_grads(*args, with_base=with_base)

    tol = TOLERANCE[dtype]
    for name, got, want in [
        ("y", y, y_ref),
        ("dx", dx, dx_ref),
        ("da", da, da_ref),
        ("db", db, db_ref),
    ]:
        assert got.dtype == dtype, name
        assert np.isfinite(np.asarray(got, np.float32)).all(), f"{name} has unwritten elements"
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
    if with_base:  # the base passes straight through: its cotangent is dY itself
        np.testing.assert_array_equal(np.asarray(dbase), np.asarray(cotangent))
    # No gradient reaches serving rows or slots without training rows.
    assert not np.asarray(dx, np.float32)[grad_rows:].any()
    trained = set(np.asarray(token_slots(ends, slots, num_rows, NUM_SLOTS))[:grad_rows]) - {-1}
    for slot in set(range(NUM_SLOTS)) - trained:
        assert (
            not np.asarray(da[slot], np.float32).any()
            and not np.asarray(db[slot], np.float32).any()
        )


def test_padded_rank_columns_stay_zero():
    """With A's and B's rank padding zero, outputs and gradients ignore it and
    the padding's gradients are exactly zero (it is never trained)."""
    d_in, rank, d_out, used_rank = 32, 16, 24, 6
    ends = np.array([10, 30, 48, 48, 48, 48, 48, 48], np.int32)
    slots = np.array([0, 3, 1, -1, -1, -1, -1, -1], np.int32)
    x, a, b, base, cotangent, scale = make_operands(7, d_in, rank, d_out, jnp.float32)
    a = a.at[:, :, used_rank:].set(0)
    b = b.at[:, used_rank:, :].set(0)
    y, (dx, da, db, _) = smlm_and_grads(
        x, a, b, base, cotangent, scale, ends, slots, NUM_ROWS, with_base=True
    )
    y_small = smlm_reference(x, a[..., :used_rank], b[:, :used_rank], scale, ends, slots, base)
    assert rel_err(y, y_small) < 1e-5
    assert not np.asarray(da)[:, :, used_rank:].any()
    assert not np.asarray(db)[:, used_rank:, :].any()


# --- the three kernels alone, with small blocks: multi-tile segments, chunks ---


@settings(max_examples=10, deadline=None)
@given(layout=layouts())
def test_kernels_with_small_blocks(layout):
    ends, slots, grad_rows, seed = layout
    d_in, rank, d_out = 40, 20, 24
    x, a, b, base, g, scale = make_operands(seed, d_in, rank, d_out, jnp.float32)
    slot = np.asarray(token_slots(ends, slots, NUM_ROWS, NUM_SLOTS))
    slot = np.where(np.arange(NUM_ROWS) < grad_rows, slot, -1)
    onehot = jnp.asarray(slot[:, None] == np.arange(NUM_SLOTS)[None, :], jnp.float32)  # [T, N]
    safe = np.maximum(slot, 0)
    hi = jax.lax.Precision.HIGHEST
    row_scale = jnp.where(slot >= 0, scale[safe], 0.0)[:, None]
    small = dict(block_rows=16, interpret=True)

    h_ref = jnp.einsum("tk,tkr->tr", x, a[safe], precision=hi) * row_scale
    for k_splits in (1, 3):  # d_in = 40 is 3 blocks of 16
        h = segment_shrink(
            x, a, ends, slots, scale, grad_rows, block_k=16, k_splits=k_splits, **small
        )
        assert rel_err(h, h_ref) < 1e-5

    mid = segment_shrink(g, b, ends, slots, None, grad_rows, w_transposed=True, block_k=16, **small)
    mid_ref = jnp.einsum("td,trd->tr", g, b[safe], precision=hi) * (slot >= 0)[:, None]
    assert rel_err(mid, mid_ref) < 1e-5

    y = segment_expand(h, b, ends, slots, scale, base, grad_rows, block_d=16, **small)
    y_ref = base + jnp.einsum("tr,trd->td", h, b[safe], precision=hi) * row_scale
    assert rel_err(y, y_ref) < 1e-5

    dx = segment_expand(
        mid, a, ends, slots, scale, None, grad_rows, w_transposed=True, block_d=16, **small
    )
    dx_ref = jnp.einsum("tr,tkr->tk", mid, a[safe], precision=hi) * row_scale
    assert rel_err(dx, dx_ref) < 1e-5

    for tiles_per_chunk in (1, 2):
        out = segment_outer(
            x,
            g,
            ends,
            slots,
            scale,
            grad_rows,
            num_slots=NUM_SLOTS,
            block_p=16,
            block_q=16,
            tiles_per_chunk=tiles_per_chunk,
            **small,
        )
        out_ref = jnp.einsum("tn,tp,tq->npq", onehot, x, g, precision=hi) * scale[:, None, None]
        assert rel_err(out, out_ref) < 1e-5


# --- the row-tile and chunk plans ---

# Jitted (one compile per static size) rather than run op by op for every example.
PLAN_ROW_TILES = jax.jit(plan_row_tiles, static_argnums=(2, 3, 4))
PLAN_SLOT_CHUNKS = jax.jit(plan_slot_chunks, static_argnums=(1, 2))


@settings(max_examples=40, deadline=None)
@given(
    layout=layouts(),
    block_rows=st.sampled_from([1, 4, 16]),
    tiles_per_chunk=st.sampled_from([1, 3]),
)
def test_plans_cover_rows_once_within_segments(layout, block_rows, tiles_per_chunk):
    ends, slots, grad_rows, _ = layout
    tiles = PLAN_ROW_TILES(ends, slots, NUM_ROWS, NUM_SLOTS, block_rows, grad_rows)
    slot_of_row = np.asarray(token_slots(ends, slots, NUM_ROWS, NUM_SLOTS))
    slot_of_row = np.where(np.arange(NUM_ROWS) < grad_rows, slot_of_row, -1)
    covered = np.zeros(NUM_ROWS, int)
    for slot, start, length in zip(*map(np.asarray, tiles), strict=True):
        assert 0 <= length <= block_rows
        covered[start : start + length] += 1
        assert (slot_of_row[start : start + length] == slot).all()
    np.testing.assert_array_equal(covered, 1)

    chunks = jax.tree.map(np.asarray, PLAN_SLOT_CHUNKS(tiles, NUM_SLOTS, tiles_per_chunk))
    sorted_slot, sorted_length = chunks.tiles.slot, chunks.tiles.length
    rows_per_slot = np.zeros(NUM_SLOTS + 1, int)
    chunk_slot = chunks.slot
    for slot, begin, end in zip(chunk_slot, chunks.begin, chunks.end, strict=True):
        assert 0 <= end - begin <= tiles_per_chunk
        assert (sorted_slot[begin:end] == slot).all()
        rows_per_slot[slot] += sorted_length[begin:end].sum()
    for slot in range(NUM_SLOTS):
        assert rows_per_slot[slot] == (slot_of_row == slot).sum()
        own = np.flatnonzero(chunk_slot == slot)  # a slot's chunks are one contiguous range
        np.testing.assert_array_equal(
            own, np.arange(chunks.slot_begin[slot], chunks.slot_end[slot])
        )


def test_out_of_range_metadata_is_clamped():
    """Decreasing ends, ends past T and slots outside the table are clamped
    (no out-of-bounds access): the kernels and the reference agree on them."""
    ends = np.array([5, 3, 30, 100, 100, 100, 100, 100], np.int32)
    slots = np.array([7, 0, 1, 2, -5, 9, 2, 2], np.int32)
    np.testing.assert_array_equal(
        np.asarray(token_slots(ends, slots, NUM_ROWS, NUM_SLOTS)), [-1] * 5 + [1] * 25 + [2] * 18
    )
    check_against_reference(SHAPES[0], jnp.float32, (ends, slots, NUM_ROWS, 3), True)


def test_one_compile_for_every_layout():
    traces = []

    @jax.jit
    def step(x, a, b, scale, ends, slots):
        traces.append(None)
        return jax.grad(lambda x, a, b: smlm(x, a, b, scale, ends, slots).sum(), argnums=(0, 1, 2))(
            x, a, b
        )

    x, a, b, _, _, scale = make_operands(0, 32, 8, 48, jnp.float32)
    for lengths in ([48, 0, 0], [1, 1, 46], [20, 20, 8]):
        ends = np.cumsum(lengths).astype(np.int32)
        jax.block_until_ready(step(x, a, b, scale, ends, np.array([0, 1, 2], np.int32)))
    assert len(traces) == 1
