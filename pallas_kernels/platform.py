"""Where the kernels run: compiled through Triton on GPUs, interpreted elsewhere."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def default_interpret() -> bool:
    """Interpret kernels (pure JAX, any backend) unless the default device is a GPU."""
    return jax.default_backend() != "gpu"


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
