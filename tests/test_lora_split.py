"""The small-batch group forward (``lora_split_forward``, which ``smlm_group`` takes at
these sizes) and ``smlm_group`` against the reference.

Each projection of a group is checked against ``smlm_reference``; gradients
against the reference's autodiff, ``dx`` summed over the group. Shapes are fixed
per test (one compile each) and hypothesis varies the segment layout. Off GPU the
kernels run interpreted, and the interpreter fills every output with NaN first,
so "matches and is finite" also proves that every output element was written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import (
    SMALL_BATCH_ROWS,
    RowTiles,
    lora_split_forward,
    plan_forward,
    plan_row_tiles,
    smlm_group,
    smlm_reference,
    token_slots,
)

from smlm_cases import NUM_ROWS, NUM_SEGMENTS, NUM_SLOTS, TOLERANCE, layouts, rel_err

D_IN = 40
assert NUM_ROWS <= SMALL_BATCH_ROWS  # smlm_group takes the small-batch forward here
# Groups of (rank, d_out, has_base): ranks below the 16-wide rank block, outputs
# that are not multiples of the column blocks; d_out = 300 takes two column
# blocks by default (256-wide sub-blocks), the second one partial. A group of
# one through smlm_group is smlm itself, which tests/test_smlm.py covers in both
# dtypes; each distinct group shape below costs a ~20 s interpreted compile.
GROUPS = {
    1: ((8, 70, True),),
    2: ((8, 300, True), (20, 24, False)),
    3: ((8, 70, True), (8, 24, True), (8, 24, False)),
}
TRACES = []  # one entry per trace of group_and_grads


def make_group(seed, group, dtype, num_rows=NUM_ROWS, d_in=D_IN, num_slots=NUM_SLOTS):
    """``x, tables, bases, cotangents`` for a group spec of ``(rank, d_out, has_base)``."""
    ks = iter(jax.random.split(jax.random.key(seed), 1 + 5 * len(group)))
    x = jax.random.normal(next(ks), (num_rows, d_in)).astype(dtype)
    tables, bases, cotangents = [], [], []
    for rank, d_out, has_base in group:
        a = jax.random.normal(next(ks), (num_slots, d_in, rank)) / np.sqrt(d_in)
        b = jax.random.normal(next(ks), (num_slots, rank, d_out)) / np.sqrt(rank)
        scale = jax.random.uniform(next(ks), (num_slots,), minval=0.5, maxval=2.0)
        tables.append((a.astype(dtype), b.astype(dtype), scale))
        base = jax.random.normal(next(ks), (num_rows, d_out)).astype(dtype)
        bases.append(base if has_base else None)
        cotangents.append(jax.random.normal(next(ks), (num_rows, d_out)).astype(dtype))
    return x, tuple(tables), tuple(bases), tuple(cotangents)


@functools.partial(jax.jit, static_argnames="planned")
def group_and_grads(x, tables, bases, cotangents, ends, slots, grad_rows, planned=False):
    """Outputs and gradients of ``smlm_group``; ``planned``: with row tiles planned
    beforehand (``plan_forward``), as a model passes them."""
    TRACES.append(None)
    tiles = plan_forward(ends, slots, x.shape[0], tables[0][0].shape[0]) if planned else None
    y, vjp = jax.vjp(
        lambda x, tables, bases: smlm_group(x, tables, bases, ends, slots, grad_rows, tiles),
        x,
        tables,
        bases,
    )
    return y, vjp(cotangents)


@jax.jit
def reference_and_grads(x, tables, bases, cotangents, ends, slots, grad_rows):
    """The reference per projection in float32, differentiated by JAX, summed over
    the group, on the training rows only."""
    f32 = functools.partial(jax.tree.map, lambda v: v.astype(jnp.float32))
    x, tables, bases, cotangents = f32((x, tables, bases, cotangents))
    train = (jnp.arange(x.shape[0]) < grad_rows)[:, None]

    def forward(x, tables, bases):
        return tuple(
            smlm_reference(x, a, b, scale, ends, slots, base)
            for (a, b, scale), base in zip(tables, bases, strict=True)
        )

    def loss(x, tables, bases):
        ys = forward(x, tables, bases)
        return sum(
            jnp.sum(jnp.where(train, y * g, 0.0)) for y, g in zip(ys, cotangents, strict=True)
        )

    return forward(x, tables, bases), jax.grad(loss, argnums=(0, 1, 2))(x, tables, bases)


def check_group(
    group, dtype, layout, num_rows=NUM_ROWS, d_in=D_IN, num_slots=NUM_SLOTS, planned=False
):
    ends, slots, grad_rows, seed = layout
    x, tables, bases, cotangents = make_group(seed, group, dtype, num_rows, d_in, num_slots)
    args = (x, tables, bases, cotangents, ends, slots, grad_rows)
    ys, (dx, dtables, dbases) = group_and_grads(*args, planned=planned)
    ys_ref, (dx_ref, dtables_ref, _) = reference_and_grads(*args)

    tol = TOLERANCE[dtype]
    checks = [("dx", dx, dx_ref)]
    for g in range(len(group)):
        checks += [
            (f"y{g}", ys[g], ys_ref[g]),
            (f"da{g}", dtables[g][0], dtables_ref[g][0]),
            (f"db{g}", dtables[g][1], dtables_ref[g][1]),
        ]
    for name, got, want in checks:
        assert got.dtype == dtype, name
        assert np.isfinite(np.asarray(got, np.float32)).all(), f"{name} has unwritten elements"
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
    for base, dbase, g in zip(bases, dbases, cotangents, strict=True):
        if base is not None:  # the base passes straight through: its cotangent is dY itself
            np.testing.assert_array_equal(np.asarray(dbase), np.asarray(g))
    # No gradient reaches serving rows or slots without training rows.
    assert not np.asarray(dx, np.float32)[grad_rows:].any()
    trained = set(np.asarray(token_slots(ends, slots, num_rows, num_slots))[:grad_rows])
    for slot in set(range(num_slots)) - trained:
        for da, db, _ in dtables:
            assert not np.asarray(da[slot], np.float32).any()
            assert not np.asarray(db[slot], np.float32).any()


@pytest.mark.parametrize(
    "size, dtype, planned",
    [(2, jnp.bfloat16, True), (3, jnp.float32, False)],
    ids=["G2-bf16-planned", "G3-f32"],
)
@settings(max_examples=8, deadline=None)
@given(layout=layouts())
def test_group_forward_and_gradients_match_reference(size, dtype, planned, layout):
    check_group(GROUPS[size], dtype, layout, planned=planned)


# Multi-tile segments (3-row tiles), several column blocks per projection with a partial
# last one (d_out = 70: blocks of 16, 16, 16, 16 and 6 columns; 24: 16 and 8), and K = 40
# in two splits of two 16-wide blocks, the last one past K.
SMALL_BLOCKS = dict(block_k=16, blocks_per_split=2, block_n=16, sub_blocks=2)
TINY_TILE_ROWS = 3


@pytest.mark.parametrize(
    "size, dtype", [(1, jnp.bfloat16), (3, jnp.float32)], ids=["G1-bf16", "G3-f32"]
)
@settings(max_examples=8, deadline=None)
@given(layout=layouts())
def test_kernel_with_small_blocks(size, dtype, layout):
    """The kernels with small blocks (``SMALL_BLOCKS``) on tiles of ``TINY_TILE_ROWS``
    rows, and the ``h`` they return for the backward."""
    ends, slots, _, seed = layout
    x, tables, bases, _ = make_group(seed, GROUPS[size], dtype)
    tiles = plan_row_tiles(ends, slots, NUM_ROWS, NUM_SLOTS, TINY_TILE_ROWS)
    tiles = RowTiles(*(field[:NUM_ROWS] for field in tiles))
    ys, hs = lora_split_forward(
        x, tables, bases, ends, slots, tiles, return_h=True, interpret=True, **SMALL_BLOCKS
    )
    slot = np.asarray(token_slots(ends, slots, NUM_ROWS, NUM_SLOTS))
    for (a, b, scale), base, y, h in zip(tables, bases, ys, hs, strict=True):
        y_ref = smlm_reference(x, a, b, scale, ends, slots, base)
        h_ref = jnp.einsum(
            "tk,tkr->tr",
            x,
            a[np.maximum(slot, 0)],
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        h_ref = jnp.where((slot >= 0)[:, None], h_ref, 0.0)
        for got, want in ((y, y_ref), (h, h_ref)):
            assert got.dtype == dtype
            assert np.isfinite(np.asarray(got, np.float32)).all()
            assert rel_err(got, want) < TOLERANCE[dtype]


def test_padded_rank_columns_stay_zero():
    """With the tables' rank padding zero, outputs ignore it and the padding's
    gradients are exactly zero (it is never trained)."""
    used_rank = 6  # of the tables' 8 (GROUPS[3], to reuse its compile)
    ends = np.array([10, 30, 48, 48, 48, 48, 48, 48], np.int32)
    slots = np.array([0, 3, 1, -1, -1, -1, -1, -1], np.int32)
    x, tables, bases, cotangents = make_group(7, GROUPS[3], jnp.float32)
    tables = tuple(
        (a.at[:, :, used_rank:].set(0), b.at[:, used_rank:, :].set(0), scale)
        for a, b, scale in tables
    )
    ys, (_, dtables, _) = group_and_grads(x, tables, bases, cotangents, ends, slots, NUM_ROWS)
    for (a, b, scale), base, y, (da, db, _) in zip(tables, bases, ys, dtables, strict=True):
        y_small = smlm_reference(x, a[..., :used_rank], b[:, :used_rank], scale, ends, slots, base)
        assert rel_err(y, y_small) < 1e-5
        assert not np.asarray(da)[:, :, used_rank:].any()
        assert not np.asarray(db)[:, used_rank:, :].any()


def test_one_compile_for_every_layout():
    """Layouts are data: group_and_grads traces at most once for all of them
    (none if the tests above already compiled GROUPS[2] in bf16, planned)."""
    x, tables, bases, cotangents = make_group(0, GROUPS[2], jnp.bfloat16)
    traces = len(TRACES)
    for lengths, grad_rows in (([48, 0, 0, 0, 0, 0, 0, 0], 48), ([1] * 8, 3), ([20] * 8, 0)):
        ends = np.minimum(np.cumsum(lengths), NUM_ROWS).astype(np.int32)
        slots = np.arange(NUM_SEGMENTS, dtype=np.int32) % NUM_SLOTS
        args = (x, tables, bases, cotangents, ends, slots, grad_rows)
        jax.block_until_ready(group_and_grads(*args, planned=True))
    assert len(TRACES) - traces <= 1


# Llama-3-8B decode: q, k and v of a 64-row batch over a table of 64 rank-8 slots.
LLAMA_QKV = ((8, 4096, True), (8, 1024, True), (8, 1024, True))
LLAMA_ROWS, LLAMA_D_IN, LLAMA_SLOTS = 64, 4096, 64


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@settings(max_examples=20, deadline=None)
@given(
    layout=st.one_of(
        st.just(  # one row per adapter: the decode case
            (
                np.arange(1, LLAMA_ROWS + 1, dtype=np.int32),
                np.arange(LLAMA_ROWS, dtype=np.int32),
                LLAMA_ROWS,
                0,
            )
        ),
        layouts(LLAMA_ROWS, LLAMA_SLOTS, LLAMA_SLOTS),
    )
)
def test_compiled_group_matches_reference_on_gpu(layout):
    """The tests above, compiled by Triton at Llama-3-8B decode shapes, on row tiles
    planned beforehand as the model plans them."""
    check_group(LLAMA_QKV, jnp.bfloat16, layout, LLAMA_ROWS, LLAMA_D_IN, LLAMA_SLOTS, planned=True)
