"""The traced side of a model on a device mesh: the layout of each projection's arrays,
and ``shard_map`` around every Pallas kernel, which GSPMD cannot partition by itself.

A model placed by ``loqjax.sharding.shard_model`` runs every array op under GSPMD (jit
partitions them by the weights' ``NamedSharding``s), except the calls here: each runs the
single-device kernel on one device's shard, inside ``jax.shard_map`` over the mesh axes
``("data", "model")``:

* the LoRA term of a projection (``lora_projection``, the SMLM kernels). Column-parallel
  (q/k/v, gate/up: B, the base output and y split along d_out over "model"): each device
  expands onto its own columns, with no communication forward; the backward psums the
  ``[T, R]`` ``mid = scale * g @ B^T`` over "model" before dx and dA. Row-parallel
  (o, down: x and A split along d_in): each device shrinks its slice of d_in, a psum of
  the ``[T, R]`` ``h`` over "model" completes ``x @ A`` before the expand; the backward
  needs no communication. Both are a ``jax.custom_vjp`` whose forward and backward are
  each one ``shard_map``, so the collectives are exactly these and the ones below.
* attention (``packed_attention``, ``write_and_attend``; the flash and paged kernels on
  a GPU, the jnp references elsewhere): per device on its KV heads (and their query
  heads), the KV pools split on the head axis, every token row on every "data" device.

Data parallelism is over the token axis: when a call's T rows split evenly over "data",
the projections' rows are sharded over it (each device runs the kernel on its own rows,
with the segment metadata rebased to them) and the adapter gradients are summed over
"data" (psum), the data-parallel gradient all-reduce. Attention gathers the rows: a
packed segment may straddle devices, and the kernels need whole segments.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from loqjax.attention import cached_attention
from loqjax.attention import packed_attention as _packed_attention
from loqjax.kv_cache import LayerKV
from pallas_kernels import smlm_group_backward, smlm_group_forward
from pallas_kernels.platform import KernelImpl

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

Split = Literal["column", "row"]

# Megatron layouts over "model" of a projection's kernel [d_in, d_out], bias [d_out] and
# LoRA tables a [N, d_in, R], b [N, R, d_out] (scales [N] are replicated): a column-
# parallel projection splits d_out, a row-parallel one d_in, so attention heads and MLP
# features stay on their device from one projection to the next.
WEIGHT_SPECS: dict[Split, dict[str, P]] = {
    "column": {"kernel": P(None, MODEL), "bias": P(MODEL), "a": P(), "b": P(None, None, MODEL)},
    "row": {"kernel": P(MODEL), "bias": P(), "a": P(None, MODEL), "b": P()},
}
POOL = P(None, None, MODEL)  # KV pools [num_pages, page_size, Hkv, D]: split on the heads
_HEADS = P(None, MODEL)  # q/k/v [T, H, D]: heads over "model", rows on every device


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """How one projection is split over a mesh: static, part of the model's graphdef (so
    every jit of the model is keyed by it).

    Attributes:
      mesh: the ("data", "model") mesh.
      split: "column": the kernel [d_in, d_out] split along d_out over "model" (q/k/v,
        gate/up); "row": split along d_in (o, down). See ``WEIGHT_SPECS``.
    """

    mesh: Mesh
    split: Split


def spec(*axes: str | None) -> P:
    """``PartitionSpec(*axes)`` without trailing Nones: the one spelling of each layout
    (jit keys its compilations by the spec as written: ``P("model", None)`` and
    ``P("model")`` would compile a step twice)."""
    axes = list(axes)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def row_axis(mesh: Mesh, num_rows: int) -> str | None:
    """ "data" if ``num_rows`` token rows split evenly over a "data" axis of several
    devices, else None: the rows are replicated (correct, not data-parallel)."""
    size = mesh.shape[DATA]
    return DATA if size > 1 and num_rows % size == 0 else None


def constrain_rows(mesh: Mesh | None, x: jax.Array) -> jax.Array:
    """``x`` [T, ...] with its rows over "data" (where they split evenly), the rest
    replicated; unchanged without a mesh."""
    if mesh is None:
        return x
    layout = spec(row_axis(mesh, x.shape[0]))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, layout))


def constrain_projection(tp: TensorParallel | None, y: jax.Array) -> jax.Array:
    """A projection's output [T, d_out] in its Megatron layout: split along d_out over
    "model" for a column-parallel one, whole (all-reduced) for a row-parallel one."""
    if tp is None:
        return y
    layout = spec(row_axis(tp.mesh, y.shape[0]), MODEL if tp.split == "column" else None)
    return jax.lax.with_sharding_constraint(y, NamedSharding(tp.mesh, layout))


# --- the LoRA term ----------------------------------------------------------------------


def lora_projection(
    tp: TensorParallel,
    x: jax.Array,
    tables,
    bases,
    seg_ends: jax.Array,
    seg_slots: jax.Array,
    grad_rows: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """``pallas_kernels.smlm_group`` (same arguments and results; every base given) of
    projections of one input split as ``tp`` says, the kernels on each device's shard."""
    assert all(base is not None for base in bases)
    tables, bases = tuple(tuple(t) for t in tables), tuple(bases)
    if grad_rows is not None:
        grad_rows = jnp.asarray(grad_rows, jnp.int32)
    return _lora(tp, x, tables, bases, seg_ends, seg_slots, grad_rows)


class _Specs(NamedTuple):
    """The shard_map specs of one ``lora_projection`` call on T rows."""

    rows: str | None  # the axis the rows are split over
    num_local: int  # rows per device
    x: P  # [T, d_in]
    table: tuple[P, P, P]  # (a, b, scale)
    y: P  # [T, d_out], each base and output
    h: P  # [T, R]: whole on every "model" device

    @classmethod
    def of(cls, tp: TensorParallel, num_rows: int) -> _Specs:
        rows = row_axis(tp.mesh, num_rows)
        num_local = num_rows // tp.mesh.shape[DATA] if rows else num_rows
        weights = WEIGHT_SPECS[tp.split]
        column = tp.split == "column"
        x = spec(rows) if column else spec(rows, MODEL)
        y = spec(rows, MODEL) if column else spec(rows)
        return cls(rows, num_local, x, (weights["a"], weights["b"], P()), y, spec(rows))

    def local(self, seg_ends: jax.Array, grad_rows: jax.Array | None = None):
        """Inside the shard_map: the segment ends and gradient row count of this device's
        rows (the metadata counts rows of the whole batch)."""
        if self.rows is None:
            return seg_ends, grad_rows
        start = jax.lax.axis_index(self.rows) * self.num_local
        seg_ends = jnp.clip(seg_ends - start, 0, self.num_local)
        if grad_rows is not None:
            grad_rows = jnp.clip(grad_rows - start, 0, self.num_local)
        return seg_ends, grad_rows


def _psum_model(x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, MODEL)


def _shard_map(tp: TensorParallel, body, in_specs, out_specs):
    # check_vma=False: the kernels' pallas_call has no varying-axes rule.
    return jax.shard_map(
        body, mesh=tp.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )


def _forward(tp, x, tables, bases, seg_ends, seg_slots, *, save_h: bool):
    """``ys``, and with ``save_h`` also ``(ys, hs)``, of the sharded forward."""
    s = _Specs.of(tp, x.shape[0])
    reduce_h = _psum_model if tp.split == "row" else None

    def body(x, tables, bases, seg_ends, seg_slots):
        seg_ends, _ = s.local(seg_ends)
        ys, hs = smlm_group_forward(
            x, tables, bases, seg_ends, seg_slots, save_h=save_h, reduce_h=reduce_h
        )
        return (ys, hs) if save_h else ys

    g = len(tables)
    ys_spec = (s.y,) * g
    return _shard_map(
        tp,
        body,
        (s.x, (s.table,) * g, ys_spec, P(), P()),
        (ys_spec, (s.h,) * g) if save_h else ys_spec,
    )(x, tables, bases, seg_ends, seg_slots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lora(tp, x, tables, bases, seg_ends, seg_slots, grad_rows):
    return _forward(tp, x, tables, bases, seg_ends, seg_slots, save_h=False)


def _lora_fwd(tp, x, tables, bases, seg_ends, seg_slots, grad_rows):
    ys, hs = _forward(tp, x, tables, bases, seg_ends, seg_slots, save_h=True)
    # Zero-size arrays remember the bases' dtypes for the backward.
    base_likes = tuple(jnp.zeros((0,), base.dtype) for base in bases)
    return ys, (x, tables, hs, seg_ends, seg_slots, grad_rows, base_likes)


def _lora_bwd(tp, residuals, gs):
    x, tables, hs, seg_ends, seg_slots, grad_rows, base_likes = residuals
    s = _Specs.of(tp, x.shape[0])
    reduce_mid = _psum_model if tp.split == "column" else None

    def body(x, tables, hs, gs, seg_ends, seg_slots, grad_rows):
        seg_ends, grad_rows = s.local(seg_ends, grad_rows)
        dx, grads = smlm_group_backward(
            x, tables, hs, gs, seg_ends, seg_slots, grad_rows, reduce_mid=reduce_mid
        )
        if s.rows is not None:  # each device's rows gave a part of every table gradient
            grads = jax.lax.psum(grads, s.rows)
        return dx, grads

    g = len(tables)
    a_spec, b_spec, _ = s.table
    dx, grads = _shard_map(
        tp,
        body,
        (s.x, (s.table,) * g, (s.h,) * g, (s.y,) * g, P(), P(), P()),
        (s.x, ((a_spec, b_spec),) * g),
    )(x, tables, hs, gs, seg_ends, seg_slots, grad_rows)
    dbases = tuple(g.astype(like.dtype) for g, like in zip(gs, base_likes, strict=True))
    return dx, tuple((da, db, None) for da, db in grads), dbases, None, None, None


_lora.defvjp(_lora_fwd, _lora_bwd)


# --- attention --------------------------------------------------------------------------


def packed_attention(
    mesh: Mesh,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    *,
    sliding_window: int | None,
    impl: KernelImpl,
) -> jax.Array:
    """``loqjax.attention.packed_attention`` with each device attending with its own
    heads (q/k/v [T, H, D] split along H over "model"); differentiable."""
    fn = functools.partial(_packed_attention, sliding_window=sliding_window, impl=impl)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(_HEADS, _HEADS, _HEADS, P(), P()),
        out_specs=_HEADS,
        check_vma=False,
    )(q, k, v, positions, segment_ids)


def write_and_attend(
    mesh: Mesh,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv: LayerKV,
    slots: jax.Array,
    page_tables: jax.Array,
    q_pos: jax.Array,
    q_seg: jax.Array,
    *,
    sliding_window: int | None,
    impl: KernelImpl,
) -> tuple[LayerKV, jax.Array]:
    """``kv.write(k, v, slots)`` then ``cached_attention`` over it, each device on its
    own KV heads and their pools' slice; returns (the written pools, the attention)."""

    def body(q, k, v, kv, slots, page_tables, q_pos, q_seg):
        kv = kv.write(k, v, slots)
        out = cached_attention(
            q, kv, page_tables, q_pos, q_seg, sliding_window=sliding_window, impl=impl
        )
        return kv, out

    pools = LayerKV(POOL, POOL)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(_HEADS, _HEADS, _HEADS, pools, P(), P(), P(), P()),
        out_specs=(pools, _HEADS),
        check_vma=False,
    )(q, k, v, kv, slots, page_tables, q_pos, q_seg)
