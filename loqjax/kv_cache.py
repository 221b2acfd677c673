"""Paged key/value cache: fixed-size pages in one preallocated pool per layer.

A layer's keys live in ``k [num_pages, page_size, Hkv, D]`` (values alike). Each sequence
owns a list of page ids, in any order: the token at position p of a sequence is stored
in its page ``pages[p // page_size]`` at offset ``p % page_size``. Flattened, that is
slot ``page * page_size + offset`` of the ``[num_pages * page_size, Hkv, D]`` pool.

Device side, pure and jitted: ``LayerKV`` (one layer's pools) and ``PageBatch`` (where one
step's tokens are written and which pages each of its sequences reads). Host side:
``PagePool`` hands page ids out and takes them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from loqjax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageBatch:
    """One step's cache addressing, for a packed batch of T tokens from up to S sequences.

    Attributes:
      page_tables: int32 [S, M]; row s lists the pages of the sequence with segment id s
        (M = pages per sequence at most); entries past its last page may be any valid
        page id: the causal mask never reads them.
      slots: int32 [T], the flat slot each token's key and value are written to; padding
        tokens get ``num_pages * page_size`` (out of range), and their writes are dropped.
    """

    page_tables: jax.Array
    slots: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's key and value pools, each [num_pages, page_size, Hkv, D]."""

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, slots: jax.Array) -> LayerKV:
        """Stores k, v [T, Hkv, D] at the flat ``slots`` [T]; out-of-range slots are dropped."""
        return LayerKV(_scatter(self.k, k, slots), _scatter(self.v, v, slots))

    def gather(self, page_tables: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every sequence's pages back to back: k, v [S * M * page_size, Hkv, D], where
        row ``(s * M + j) * page_size + o`` holds position ``j * page_size + o`` of
        sequence s."""
        s, m = page_tables.shape
        _, page_size, h, d = self.k.shape
        shape = (s * m * page_size, h, d)
        return self.k[page_tables].reshape(shape), self.v[page_tables].reshape(shape)


# One ``LayerKV`` per decoder layer.
KVCache = tuple[LayerKV, ...]


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype) -> KVCache:
    """Zeroed pools for every layer of a ``config`` model."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    return tuple(
        LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)
    )


def page_slots(pages: Sequence[int], start: int, stop: int, page_size: int) -> np.ndarray:
    """int32 [stop - start] flat slots of positions ``[start, stop)`` of a sequence that
    owns ``pages`` (enough of them to hold position ``stop - 1``)."""
    if stop - start == 1:  # a decode row, every step: integer arithmetic, 10x cheaper
        return np.array([pages[start // page_size] * page_size + start % page_size], np.int32)
    positions = np.arange(start, stop)
    page_ids = np.asarray(pages, np.int32)[positions // page_size]
    return (page_ids * page_size + positions % page_size).astype(np.int32)


def _scatter(pool: jax.Array, x: jax.Array, slots: jax.Array) -> jax.Array:
    num_pages, page_size, h, d = pool.shape
    flat = pool.reshape(num_pages * page_size, h, d)
    return flat.at[slots].set(x.astype(pool.dtype), mode="drop").reshape(pool.shape)


class PagePool:
    """Host-side allocator of the page ids ``[0, num_pages)`` shared by every layer."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # a stack, lowest id on top
        self._is_free = np.ones(num_pages, bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens of one sequence."""
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """n free page ids, or None (nothing taken) if fewer than n are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        self._is_free[taken] = False
        return taken

    def free(self, pages: Sequence[int]) -> None:
        """Returns pages taken by ``allocate``.

        Raises:
          ValueError: a page is out of range or already free (a bookkeeping bug).
        """
        pages = list(pages)
        in_range = all(0 <= p < self.num_pages for p in pages)
        if not in_range or len(set(pages)) < len(pages) or self._is_free[pages].any():
            raise ValueError(f"freeing pages {pages} that are not all allocated")
        self._is_free[pages] = True
        self._free.extend(pages)
