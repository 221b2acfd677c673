"""The Pallas paged-attention kernel against ``loqjax.attention.paged_attention``.

Interpreted off GPU. Shapes and tilings are fixed per variant (one compile each, shared by
every example), as in the engine, where the step's capacity is static; hypothesis draws
the layout, which is data: decode rows and prefill chunks whose earlier positions are
already cached, shuffled page ids, page-table entries past a sequence's pages pointing
anywhere, stale NaN/inf in unused pages and unwritten slots, padding rows. The interpreter
fills outputs with NaN first (tests/test_smlm.py::test_interpreter_poisons_outputs), so
"finite and equal to the reference" also proves that every output element was written.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loqjax.attention import paged_attention as reference_paged_attention
from loqjax.kv_cache import LayerKV
from pallas_kernels import AttentionBlocks, paged_attention, plan_query_tiles
from pallas_kernels.paged_attention import DECODE_BLOCKS, PREFILL_BLOCKS

NUM_ROWS, NUM_SEQS, PAGES_PER_SEQ, PAGE_SIZE, NUM_PAGES, NUM_KV_HEADS = 48, 6, 8, 8, 64, 2
MAX_CONTEXT = PAGES_PER_SEQ * PAGE_SIZE  # 64 positions: four 16-key blocks
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
HEAD_DIM = {jnp.float32: 16, jnp.bfloat16: 32}
GARBAGE = np.array([np.nan, np.inf, -np.inf, 3e38], np.float32)

# Small blocks, so tiles span several key blocks (unmasked and masked ones), chunks span
# several prefill tiles, and both the split and the direct path of each kernel run.
SPLIT_DECODE = (
    AttentionBlocks(block_m=16, block_k=16, k_splits=None, num_warps=4, num_stages=2),
    AttentionBlocks(block_m=32, block_k=16, k_splits=1, num_warps=4, num_stages=2),
)
SPLIT_PREFILL = (
    AttentionBlocks(block_m=16, block_k=16, k_splits=1, num_warps=4, num_stages=2),
    AttentionBlocks(block_m=32, block_k=16, k_splits=3, num_warps=4, num_stages=2),
)


class Variant(NamedTuple):
    group: int  # Hq // Hkv
    dtype: type
    window: int | None
    blocks: tuple[AttentionBlocks, AttentionBlocks]  # (decode, prefill)
    page_size: int = PAGE_SIZE  # the context stays MAX_CONTEXT; the pool the same size

    def batch(self, layout) -> Batch:
        pages_per_seq = MAX_CONTEXT // self.page_size
        return make_batch(
            layout,
            self.group,
            self.dtype,
            pages_per_seq=pages_per_seq,
            page_size=self.page_size,
            num_pages=NUM_PAGES * PAGES_PER_SEQ // pages_per_seq,
        )


VARIANTS = {
    "g1-f32": Variant(1, jnp.float32, None, SPLIT_DECODE),
    # Pages of 32 keys: each 16-key block reads half a page.
    "g2-f32-win5-page32": Variant(2, jnp.float32, 5, SPLIT_PREFILL, page_size=32),
    "g4-f32-win20": Variant(4, jnp.float32, 20, SPLIT_DECODE),
    "g1-bf16-win20": Variant(1, jnp.bfloat16, 20, SPLIT_PREFILL),
    "g2-bf16": Variant(2, jnp.bfloat16, None, SPLIT_DECODE),
    "g4-bf16": Variant(4, jnp.bfloat16, None, SPLIT_PREFILL),
}


class Batch(NamedTuple):
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    page_tables: np.ndarray
    q_pos: np.ndarray
    q_seg: np.ndarray
    visible: list  # per sequence: (segment id, pages, first row, start, stop)


@st.composite
def layouts(draw, num_rows=NUM_ROWS):
    """Sequences (segment id, cached prefix, rows this step) packed back to back."""
    num_seqs = draw(st.integers(1, NUM_SEQS))
    segs = draw(st.permutations(range(NUM_SEQS)))[:num_seqs]  # rows not in segment order
    seqs, rows = [], 0
    for seg in segs:
        length = draw(st.sampled_from([1, 1, 1, 2, 3, 5, 9, 16, 17, 24, 33]))
        length = min(length, num_rows - rows)
        if length == 0:
            break
        start = draw(st.integers(0, MAX_CONTEXT - length))
        seqs.append((seg, start, start + length))
        rows += length
    return seqs, draw(st.integers(0, 2**31 - 1))


def make_batch(
    layout,
    group: int,
    dtype,
    num_rows=NUM_ROWS,
    num_seqs=NUM_SEQS,
    pages_per_seq=PAGES_PER_SEQ,
    page_size=PAGE_SIZE,
    num_pages=NUM_PAGES,
    num_kv_heads=NUM_KV_HEADS,
    head_dim=None,
) -> Batch:
    seqs, seed = layout
    head_dim = head_dim or HEAD_DIM[dtype]
    rng = np.random.default_rng(seed)
    pool_shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = rng.standard_normal(pool_shape, np.float32)
    v = rng.standard_normal(pool_shape, np.float32)
    q = rng.standard_normal((num_rows, num_kv_heads * group, head_dim), np.float32)
    # Entries past a sequence's pages: any valid page, often another sequence's.
    page_tables = rng.integers(0, num_pages, (num_seqs, pages_per_seq)).astype(np.int32)
    q_pos = rng.integers(0, pages_per_seq * page_size, num_rows).astype(np.int32)  # padding: any
    q_seg = np.full(num_rows, -1, np.int32)
    owned = np.zeros(num_pages, bool)
    free = list(rng.permutation(num_pages))
    visible, row = [], 0
    for seg, start, stop in seqs:
        pages = [free.pop() for _ in range(-(-stop // page_size))]
        owned[pages] = True
        page_tables[seg, : len(pages)] = pages
        q_pos[row : row + stop - start] = np.arange(start, stop)
        q_seg[row : row + stop - start] = seg
        # Slots past the last position this step writes hold a previous owner's garbage.
        for position in range(stop, len(pages) * page_size):
            page, offset = pages[position // page_size], position % page_size
            for pool in (k, v):
                pool[page, offset] = rng.choice(GARBAGE, pool.shape[2:])
        visible.append((seg, pages, row, start, stop))
        row += stop - start
    for pool in (k, v):
        pool[~owned] = rng.choice(GARBAGE, pool[~owned].shape)
    cast = lambda x: np.asarray(jnp.asarray(x, dtype))  # noqa: E731
    return Batch(cast(q), cast(k), cast(v), page_tables, q_pos, q_seg, visible)


# Compiling the interpreted kernels dominates this file's run time, and XLA's CPU backend
# compiles them about twice as fast without optimisation; they still run in milliseconds.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_compiled = {}


def fast_jit(fn, *args, **static):
    """``jax.jit(fn)(*args, **static)``, ``static`` static, compiled with FAST_COMPILE once
    per shapes and statics."""
    args = tuple(map(jnp.asarray, args))
    key = (fn, tuple(sorted(static.items())), tuple((a.shape, a.dtype) for a in args))
    if key not in _compiled:
        jitted = jax.jit(functools.partial(fn, **static))
        _compiled[key] = jitted.lower(*args).compile(compiler_options=FAST_COMPILE)
    return _compiled[key](*args)


def reference_f32(q, k, v, page_tables, q_pos, q_seg, window):
    """The jnp reference in float32 (of the already-rounded inputs)."""
    kv = LayerKV(k.astype(jnp.float32), v.astype(jnp.float32))
    return reference_paged_attention(q.astype(jnp.float32), kv, page_tables, q_pos, q_seg, window)


def reference(batch: Batch, window):
    return np.asarray(fast_jit(reference_f32, *batch[:6], window=window))


def run_kernel(batch: Batch, variant: Variant):
    decode, prefill = variant.blocks
    out = fast_jit(
        paged_attention,
        *batch[:6],
        sliding_window=variant.window,
        interpret=True,
        decode_blocks=decode,
        prefill_blocks=prefill,
    )
    return np.asarray(out.astype(jnp.float32))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_against_reference(batch: Batch, variant: Variant):
    out = run_kernel(batch, variant)
    want = reference(batch, variant.window)
    rows = batch.q_seg >= 0
    assert np.isfinite(out).all(), "unwritten or poisoned elements"
    np.testing.assert_array_equal(out[~rows], 0)  # padding rows are zeros
    assert np.isfinite(want[rows]).all()  # the garbage is invisible to the reference too
    err = rel_err(out[rows], want[rows])
    assert err < TOLERANCE[variant.dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=8, deadline=None)
@given(layout=layouts())
def test_kernel_matches_reference(name, layout):
    variant = VARIANTS[name]
    check_against_reference(variant.batch(layout), variant)


@settings(max_examples=6, deadline=None)
@given(layout=layouts())
def test_default_blocks_and_padded_group_match_reference(layout):
    """The default tiling (one key block per tile here) on pages of 16, with a group of 3
    q heads padded to 4 in the dot's M side."""
    batch = make_batch(layout, 3, jnp.float32, pages_per_seq=4, page_size=16, num_pages=32)
    out = np.asarray(fast_jit(paged_attention, *batch[:6], interpret=True))
    want = reference(batch, None)
    rows = batch.q_seg >= 0
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[~rows], 0)
    assert rel_err(out[rows], want[rows]) < 1e-5


@pytest.mark.parametrize("name", ["g4-f32-win20", "g2-bf16"])
@settings(max_examples=6, deadline=None)
@given(
    layout=layouts(),
    which=st.integers(0, NUM_SEQS - 1),
    into_keys=st.booleans(),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    spot=st.integers(0, 2**31 - 1),
)
def test_non_finite_visible_value_stays_in_its_sequence(
    name, layout, which, into_keys, value, spot
):
    """A non-finite value in one sequence's visible cache poisons exactly the queries of
    that sequence the reference poisons (those that see it, in that kv head's group) and
    leaves every other output bit for bit as it was."""
    variant = VARIANTS[name]
    clean = variant.batch(layout)
    seg, pages, first_row, start, stop = clean.visible[which % len(clean.visible)]
    rng = np.random.default_rng(spot)
    position = int(rng.integers(0, stop))
    head, dim = int(rng.integers(NUM_KV_HEADS)), int(rng.integers(HEAD_DIM[variant.dtype]))
    pool = (clean.k if into_keys else clean.v).copy()
    page, offset = pages[position // variant.page_size], position % variant.page_size
    pool[page, offset, head, dim] = value
    bad = clean._replace(**{"k" if into_keys else "v": pool})

    before, after = run_kernel(clean, variant), run_kernel(bad, variant)
    want = reference(bad, variant.window)
    poisoned = ~np.isfinite(after)
    np.testing.assert_array_equal(poisoned, np.isnan(want) & (clean.q_seg >= 0)[:, None, None])
    # Some query of the sequence sees it: the last one does unless the window ends first.
    window = variant.window or MAX_CONTEXT + 1
    assert poisoned.any() == (max(start, position) - position < window)
    rest = ~poisoned.any(axis=2)
    np.testing.assert_array_equal(after[rest], before[rest])
    others = clean.q_seg != seg
    np.testing.assert_array_equal(after[others], before[others])


@settings(max_examples=30, deadline=None)
@given(
    layout=layouts(),
    large_rows=st.sampled_from([1, 4, 32]),
    small_rows=st.sampled_from([1, 4, 16]),
)
def test_query_tiles_cover_rows_once_within_sequences(layout, large_rows, small_rows):
    batch = make_batch(layout, 1, jnp.float32)
    plan = fast_jit(
        plan_query_tiles,
        batch.q_seg,
        num_seqs=NUM_SEQS,
        large_rows=large_rows,
        small_rows=small_rows,
    )
    covered = np.zeros(NUM_ROWS, int)
    row_small = np.asarray(plan.row_small)
    for is_small, tiles in ((1, plan.small), (0, plan.large)):
        limit = min(small_rows, large_rows) if is_small else large_rows
        for w, (seg, start, length) in enumerate(zip(*map(np.asarray, tiles), strict=True)):
            assert 0 <= length <= limit
            if length == 0:
                continue
            rows = slice(start, start + length)
            covered[rows] += 1
            np.testing.assert_array_equal(batch.q_seg[rows], seg)  # never straddles
            assert (row_small[rows] == is_small).all()
            np.testing.assert_array_equal(np.asarray(plan.row_tile)[rows], w)
            np.testing.assert_array_equal(np.asarray(plan.row_offset)[rows], np.arange(length))
            run_ends = start + length == NUM_ROWS or batch.q_seg[start + length] != seg
            # Small: a run's short last tile; large: the others (full unless last).
            if is_small:
                assert run_ends and length <= small_rows
            else:
                assert length == large_rows if not run_ends else length > small_rows
    np.testing.assert_array_equal(covered, 1)


def test_rejects_unsupported_shapes():
    batch = make_batch(([(0, 0, 3)], 0), 2, jnp.float32, head_dim=24)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(*map(jnp.asarray, batch[:6]), interpret=True)
    batch = make_batch(([(0, 0, 3)], 0), 2, jnp.float32)
    bad_blocks = AttentionBlocks(24, 16, 1, 4, 2)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(*map(jnp.asarray, batch[:6]), interpret=True, decode_blocks=bad_blocks)


# --- Llama-3-8B shapes: S = 64 decode rows and a 256-row chunk, contexts up to 1024 ---

GPU_ROWS, GPU_SEQS, GPU_PAGE, GPU_PAGES_PER_SEQ, GPU_KV_HEADS, GPU_GROUP = 384, 65, 16, 64, 8, 4
GPU_NUM_PAGES = GPU_SEQS * GPU_PAGES_PER_SEQ + 64


def realistic_operands(page_size: int, dtype=jnp.bfloat16):
    """Abstract operands of the realistic step, pools of the same size in pages of
    ``page_size``."""
    pages_per_seq = GPU_PAGES_PER_SEQ * GPU_PAGE // page_size
    num_pages = GPU_NUM_PAGES * GPU_PAGE // page_size
    pool = jax.ShapeDtypeStruct((num_pages, page_size, GPU_KV_HEADS, 128), dtype)
    return (
        jax.ShapeDtypeStruct((GPU_ROWS, GPU_KV_HEADS * GPU_GROUP, 128), dtype),
        pool,
        pool,
        jax.ShapeDtypeStruct((GPU_SEQS, pages_per_seq), jnp.int32),
        jax.ShapeDtypeStruct((GPU_ROWS,), jnp.int32),
        jax.ShapeDtypeStruct((GPU_ROWS,), jnp.int32),
    )


# (window, decode k_splits, prefill k_splits): the defaults (no split at S = 65), and both
# kernels split.
GPU_CASES = [(None, None, 1), (256, 4, 2)]


def realistic_blocks(decode_splits, prefill_splits):
    return dict(
        decode_blocks=DECODE_BLOCKS._replace(k_splits=decode_splits),
        prefill_blocks=PREFILL_BLOCKS._replace(k_splits=prefill_splits),
    )


@pytest.mark.parametrize(
    ("window", "decode_splits", "prefill_splits", "page_size"),
    [(*case, GPU_PAGE) for case in GPU_CASES] + [(None, None, 1, 8), (None, 4, 1, 128)],
)
def test_lowers_to_valid_triton_ir(
    cuda_lowering, monkeypatch, window, decode_splits, prefill_splits, page_size
):
    """On any host: both kernels lower through Pallas' Triton backend at Llama-3-8B shapes
    and the Triton modules verify. Compiling them to PTX and running them needs a GPU
    (the gpu-marked test below)."""
    # A private module: the hook that hands over each kernel's Triton module.
    triton_lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
    modules = []
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        with result.module.context:
            modules.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    blocks = realistic_blocks(decode_splits, prefill_splits)
    text = (
        paged_attention.trace(
            *realistic_operands(page_size), sliding_window=window, interpret=False, **blocks
        )
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert modules == [True, True]
    assert text.count("__gpu$xla.gpu.triton") == 2


def realistic_layout(seed: int):
    rng = np.random.default_rng(seed)
    contexts = rng.integers(1, 1025, GPU_SEQS - 1)
    seqs = [(s, int(c) - 1, int(c)) for s, c in enumerate(contexts)]  # 64 decode rows
    chunk_start = int(rng.integers(0, 1024 - 256 + 1))
    seqs.append((GPU_SEQS - 1, chunk_start, chunk_start + 256))  # and one prefill chunk
    return seqs, seed


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize(("window", "decode_splits", "prefill_splits"), GPU_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_kernel_matches_reference_on_gpu(window, decode_splits, prefill_splits, seed):
    """The interpreted tests above, compiled by Triton, at Llama-3-8B shapes in bf16."""
    batch = make_batch(
        realistic_layout(seed),
        GPU_GROUP,
        jnp.bfloat16,
        num_rows=GPU_ROWS,
        num_seqs=GPU_SEQS,
        pages_per_seq=GPU_PAGES_PER_SEQ,
        page_size=GPU_PAGE,
        num_pages=GPU_NUM_PAGES,
        num_kv_heads=GPU_KV_HEADS,
        head_dim=128,
    )
    blocks = realistic_blocks(decode_splits, prefill_splits)
    out = paged_attention(*map(jnp.asarray, batch[:6]), sliding_window=window, **blocks)
    out = np.asarray(out.astype(jnp.float32))
    want = np.asarray(jax.jit(reference_f32, static_argnums=6)(*batch[:6], window))
    rows = batch.q_seg >= 0
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[~rows], 0)
    assert rel_err(out[rows], want[rows]) < 1e-2
