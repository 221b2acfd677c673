"""The paged KV cache: a model extending a cache step by step gives the logits of one
forward over whole sequences; the host page allocator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from loqjax.kv_cache import LayerKV, PageBatch, PagePool, init_kv_cache, page_slots

from hf_reference import rel_err

PAGE_SIZE = 4
NUM_PAGES = 16
CAPACITY = 16  # tokens per step
ROWS = 4  # sequences per step
PAGES_PER_SEQ = 4

# Per step, (sequence, first token, stop token) chunks in packing order: prompts are
# split into chunks, sequences change rows between steps, and pages are taken as the
# sequences grow, so each one's pages are scattered through the pool.
LENGTHS = (11, 7, 14)
STEPS = (
    ((0, 0, 6), (1, 0, 7)),
    ((2, 0, 9), (0, 6, 11)),
    ((1, 7, 7), (2, 9, 13)),
    ((2, 13, 14),),
)


@pytest.fixture(scope="module")
def cached_forward():
    return nnx.jit(
        lambda model, tokens, positions, segment_ids, cache, pages: model(
            tokens, positions, segment_ids, cache=cache, pages=pages
        )
    )


@pytest.mark.parametrize("arch", ["mistral", "llama3"])
def test_cached_steps_equal_one_forward(arch, hf_models, loaded_models, cached_forward, forward):
    """Mistral has a sliding window, llama3 a single kv head."""
    config, model = loaded_models[arch]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, config.vocab_size, n, dtype=np.int32) for n in LENGTHS]
    # Garbage in never-written slots must never be read.
    cache = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
        init_kv_cache(config, NUM_PAGES, PAGE_SIZE, jnp.float32),
    )
    pool = PagePool(NUM_PAGES, PAGE_SIZE)
    pages = [[] for _ in LENGTHS]
    logits = [np.zeros((n, config.vocab_size), np.float32) for n in LENGTHS]

    for chunks in STEPS:
        tokens = np.zeros(CAPACITY, np.int32)
        positions = np.zeros(CAPACITY, np.int32)
        segment_ids = np.full(CAPACITY, -1, np.int32)
        slots = np.full(CAPACITY, NUM_PAGES * PAGE_SIZE, np.int32)
        page_tables = np.zeros((ROWS, PAGES_PER_SEQ), np.int32)
        offset = 0
        for row, (k, start, stop) in enumerate(chunks):
            pages[k] += pool.allocate(pool.pages_for(stop) - len(pages[k]))
            rows = slice(offset, offset + stop - start)
            tokens[rows] = seqs[k][start:stop]
            positions[rows] = np.arange(start, stop)
            segment_ids[rows] = row
            slots[rows] = page_slots(pages[k], start, stop, PAGE_SIZE)
            page_tables[row, : len(pages[k])] = pages[k]
            offset += stop - start
        out, cache = cached_forward(
            model, tokens, positions, segment_ids, cache, PageBatch(page_tables, slots)
        )
        offset = 0
        for k, start, stop in chunks:
            logits[k][start:stop] = out[offset : offset + stop - start]
            offset += stop - start

    assert any(np.any(np.diff(ps) != 1) for ps in pages), "some pages should be scattered"
    for k, seq in enumerate(seqs):
        n = len(seq)
        ref = forward(model, seq, np.arange(n, dtype=np.int32), np.zeros(n, np.int32))
        assert rel_err(logits[k], ref) < 1e-5
        assert rel_err(logits[k], hf_models[arch].logits(seq, np.arange(n))) < 1e-4


def test_layer_kv_write_and_gather():
    kv = LayerKV(jnp.zeros((3, 2, 1, 1)), jnp.zeros((3, 2, 1, 1)))
    x = jnp.arange(1.0, 4.0).reshape(3, 1, 1)
    kv = kv.write(x, -x, jnp.array([5, 0, 6]))  # slot 6 is out of range: dropped
    np.testing.assert_array_equal(kv.k[:, :, 0, 0], [[2, 0], [0, 0], [0, 1]])
    k, v = kv.gather(jnp.array([[2, 0], [1, 1]]))
    np.testing.assert_array_equal(k[:, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(v[:, 0, 0], [0, -1, -2, 0, 0, 0, 0, 0])


def test_page_slots():
    np.testing.assert_array_equal(page_slots([7, 2], 3, 6, page_size=4), [31, 8, 9])
    for position, slot in ((3, 31), (4, 8), (0, 28)):  # one position: a decode row
        got = page_slots([7, 2], position, position + 1, page_size=4)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, [slot])


def test_page_pool_allocates_all_or_nothing_and_checks_frees():
    pool = PagePool(num_pages=5, page_size=4)
    assert (pool.pages_for(0), pool.pages_for(4), pool.pages_for(5)) == (0, 1, 2)
    first = pool.allocate(3)
    assert first == [0, 1, 2] and pool.num_free == 2
    assert pool.allocate(3) is None and pool.num_free == 2
    assert pool.allocate(0) == []
    with pytest.raises(ValueError, match="not all allocated"):
        pool.free([3])
    with pytest.raises(ValueError, match="not all allocated"):
        pool.free([0, 0])
    with pytest.raises(ValueError, match="not all allocated"):
        pool.free([5])
    pool.free(first)
    assert pool.num_free == 5
    assert sorted(pool.allocate(5)) == list(range(5))
