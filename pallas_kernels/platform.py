"""Where the kernels run: compiled through Triton on GPUs, interpreted elsewhere; and
which implementation a caller gets by default (``use_kernels``)."""

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

KernelImpl = Literal["auto", "pallas", "reference"]
"""What computes the attention and SMLM of a model: ``"pallas"``, the kernels (compiled on
a GPU, interpreted elsewhere: exact but slow, for tests); ``"reference"``, the plain-jnp
references; ``"auto"``, the kernels on a GPU and the references elsewhere."""


def use_kernels(impl: KernelImpl) -> bool:
    """Whether ``impl`` means the Pallas kernels on the default backend.

    >>> use_kernels("reference")
    False
    """
    if impl not in ("auto", "pallas", "reference"):
        raise ValueError(f"kernel impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    # Off GPU the kernels only run interpreted, which is for tests: never a default.
    return impl == "pallas" or (impl == "auto" and jax.default_backend() == "gpu")


def default_interpret() -> bool:
    """Interpret kernels (pure JAX, any backend) unless the default device is a GPU."""
    return jax.default_backend() != "gpu"


def covering(shape: tuple[int, ...], reach: tuple[int, ...]) -> pl.BlockSpec:
    """The whole array as one block, each axis as long as the kernel's windows reach.

    A kernel that slides windows over an array (``pl.ds(start, size)``: row tiles, K
    blocks, a rank block wider than the rank) must keep every window inside its ref; this
    block is the array grown to ``reach`` on each axis, so they are, by construction.
    The backends do the rest: Triton masks every load and store past the array's real end
    (a block that does not divide its axis), and interpret mode pads the array with
    uninitialized values (NaN), so a kernel must still mask what it reads there. Inside
    the kernel ``ref.shape`` is then the block's: pass real extents in statically.

    Args:
      shape: the array's shape.
      reach: per axis, how far the windows reach (``tile_reach``, ``block_reach``), at
        most ``shape`` where no window passes the end.
    """
    block = tuple(max(n, r) for n, r in zip(shape, reach, strict=True))
    return pl.BlockSpec(block, lambda *_: (0,) * len(block))


def tile_reach(extent: int, size: int) -> int:
    """How far windows of ``size`` starting anywhere in ``[0, extent]`` reach (row tiles)."""
    return extent + size


def block_reach(extent: int, size: int) -> int:
    """How far the ``cdiv(extent, size)`` aligned windows of ``size`` reach."""
    return pl.cdiv(extent, size) * size


def rank_block(rank: int) -> int:
    """Rank block: a power of two, at least 16 (the smallest Triton dot side)."""
    return max(16, pl.next_power_of_2(rank))


def axis_mask(block_index, block_size: int, extent: int):
    """In-bounds mask of one block along one axis, or None when every block is full.

    Leaving out masks that are statically all-true matters on GPUs: Triton only
    vectorizes loads and stores along an axis whose mask it can prove constant.
    """
    if extent % block_size == 0:
        return None
    return block_index * block_size + jnp.arange(block_size) < extent


def block_mask(rows, cols):
    """The 2-D mask of a ``[len(rows), len(cols)]`` block from per-axis masks
    (either may be None: all true); None when both are."""
    if rows is None and cols is None:
        return None
    if rows is None:
        return cols[None, :]
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def load(ref, mask):
    """``plgpu.load`` that zero-fills masked-out elements (Triton rejects a fill
    value without a mask)."""
    return plgpu.load(ref, mask=mask, other=None if mask is None else 0)


DOT_ROWS = 16  # rows of the small-batch kernels' dots: Triton's smallest side


def rows_dot(lhs, rhs):
    """``lhs @ rhs`` in ``rhs``'s dtype, float32 accumulation, full precision: the
    small-batch kernels' dots."""
    return lax.dot_general(
        lhs.astype(rhs.dtype),
        rhs,
        (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
