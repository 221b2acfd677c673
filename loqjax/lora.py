"""Virtualized LoRA adapter tables: N adapter slots per projection, chosen per token.

``add_lora_tables`` gives the targeted projections of a ``CausalLM`` one ``LoraTable``
each. A table stacks every slot's A and B, zero-padded to a common ``max_rank``, and a
per-slot scale; a ``LoraBatch`` passed to the model says which slot serves which rows,
and every table applies its slot with the segmented multi-LoRA matmul (``smlm``).
Shapes never depend on which adapters are loaded, so the forward compiles once.

Adapter weights are ``LoraParam`` (a ``nnx.Param`` subclass) and the scales
``LoraScale``, so filters separate them from the frozen base: ``nnx.state(model,
LoraParam)`` is what training differentiates, ``BASE_PARAMS`` the rest of the params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loqjax import sharding
from loqjax.model import PROJECTIONS, CausalLM
from pallas_kernels import RowTiles, plan_forward
from pallas_kernels.platform import KernelImpl

# Projection name -> the submodule of a decoder layer that holds it (HF names).
TARGET_MODULES = {name: parent for parent, names in PROJECTIONS.items() for name in names}

# (layer index, projection name), e.g. (0, "q_proj"): one table of a model.
ModuleKey = tuple[int, str]


class LoraParam(nnx.Param):
    """A trainable adapter weight; every other ``nnx.Param`` of the model is frozen base."""


class LoraScale(nnx.Variable):
    """Per-slot LoRA scaling; set when an adapter is loaded, never trained."""


BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(LoraParam))
"""Filter for the frozen base weights (``nnx.Param`` alone also matches ``LoraParam``)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraBatch:
    """Per-token adapter selection of a packed batch, threaded down to every projection.

    Rows are split into S contiguous segments; segment i covers rows
    ``[seg_ends[i-1], seg_ends[i])`` (``seg_ends[-1] := 0``) and is served by slot
    ``seg_slots[i]``, or by the base model alone if that is -1. Rows past the last end
    (batch padding) get the base model only. Keep S fixed across steps: it is a shape.

    Attributes:
      seg_ends: int32 [S], non-decreasing exclusive end rows.
      seg_slots: int32 [S], adapter slot per segment in [0, num_slots), or -1.
      grad_rows: int32 scalar or None: only rows ``[0, grad_rows)`` (training rows come
        first) take part in the adapter backward; None means all rows.
      train_rows: static int or None: rows ``[train_rows, T)`` are never differentiated,
        so the base projections' input gradient is computed for the leading rows only
        (and is zero past them); None differentiates every row.
      tiles: the small-batch SMLM forward's row tiles of this metadata
        (``pallas_kernels.plan_forward``), which ``CausalLM`` plans once per step for all
        its projections (``with_plan``); None: every kernel call plans its own.
      kernels: static, what computes the adapter terms (``pallas_kernels.platform``'s
        ``KernelImpl``); ``CausalLM`` sets its own (``on``).
    """

    seg_ends: jax.Array
    seg_slots: jax.Array
    grad_rows: jax.Array | None = None
    train_rows: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    tiles: RowTiles | None = None
    kernels: KernelImpl = dataclasses.field(default="auto", metadata=dict(static=True))

    @classmethod
    def pack(
        cls,
        lengths: Sequence[int],
        slots: Sequence[int],
        num_segments: int,
        grad_rows: int | None = None,
        train_rows: int | None = None,
        placement: jax.sharding.Sharding | None = None,
    ) -> LoraBatch:
        """Metadata for sequences of ``lengths`` packed back to back from row 0, on the
        device: ``pack_host``'s (same arguments) put on ``placement`` in one transfer.

        Args:
          placement: where the arrays go (``jax.device_put``); default the default
            device, uncommitted. On a device mesh, ``loqjax.sharding.replicated``.
        """
        host = cls.pack_host(lengths, slots, num_segments, grad_rows, train_rows)
        # One transfer for the whole batch: per-array transfers cost host time per step.
        return jax.device_put(host, placement)

    @classmethod
    def pack_host(
        cls,
        lengths: Sequence[int],
        slots: Sequence[int],
        num_segments: int,
        grad_rows: int | None = None,
        train_rows: int | None = None,
    ) -> LoraBatch:
        """The metadata of ``pack`` as numpy arrays, for a caller that puts it on the
        device inside a larger batch (each ``jax.device_put`` costs host time).
        Consecutive sequences of one slot share a segment (see ``_slot_runs``).

        Args:
          lengths: tokens of each sequence, in packing order.
          slots: adapter slot of each sequence, -1 for the base model alone; the caller
            vouches that they are loaded (``AdapterRegistry.batch`` checks names).
          num_segments: the static S; at least ``len(lengths)``.
          grad_rows, train_rows: see the class docstring.
        """
        if len(lengths) != len(slots):
            raise ValueError(f"{len(lengths)} lengths but {len(slots)} slots")
        if len(lengths) > num_segments:
            raise ValueError(f"{len(lengths)} sequences exceed num_segments={num_segments}")
        if any(n < 0 for n in lengths):
            raise ValueError(f"negative sequence length in {list(lengths)}")
        ends, run_slots = _slot_runs(lengths, slots)
        # Unused segments repeat the last end: zero-length, they cover no row.
        seg_ends = np.full(num_segments, sum(lengths), np.int32)
        seg_ends[: len(ends)] = ends
        seg_slots = np.full(num_segments, -1, np.int32)
        seg_slots[: len(run_slots)] = run_slots
        return cls(
            seg_ends, seg_slots, None if grad_rows is None else np.int32(grad_rows), train_rows
        )

    def on(self, kernels: KernelImpl) -> LoraBatch:
        """This batch with its adapter terms computed by ``kernels``."""
        return self if kernels == self.kernels else dataclasses.replace(self, kernels=kernels)

    def with_plan(self, num_rows: int, num_slots: int) -> LoraBatch:
        """This batch with ``tiles`` planned for ``num_rows`` rows over tables of
        ``num_slots`` slots (traced, inside the step)."""
        tiles = plan_forward(self.seg_ends, self.seg_slots, num_rows, num_slots)
        return dataclasses.replace(self, tiles=tiles)


def _slot_runs(lengths: Sequence[int], slots: Sequence[int]) -> tuple[list[int], list[int]]:
    """(exclusive end row, slot) of each run of consecutive sequences of one slot.

    A kernel's row tiles never straddle a segment, so one segment per run lets a tile
    hold many sequences' rows: a decode step has one row per sequence, and one segment
    each would load an adapter's weights once per row.
    """
    ends: list[int] = []
    run_slots: list[int] = []
    end = 0
    for length, slot in zip(lengths, slots, strict=True):
        end += length
        if run_slots and run_slots[-1] == slot:
            ends[-1] = end
        else:
            ends.append(end)
            run_slots.append(slot)
    return ends, run_slots


class LoraTable(nnx.Module):
    """N LoRA slots of one projection ``[d_in] -> [d_out]``, rank-padded to R.

    Slot s adds ``scale[s] * (x @ a[s]) @ b[s]``. An adapter of rank r < R fills the
    first r columns of ``a[s]`` and rows of ``b[s]`` and leaves the rest zero: padded
    columns then contribute nothing and their gradients are exactly zero. A slot whose
    adapter does not target this projection is all zeros with scale 0.

    Attributes:
      a: LoraParam [N, d_in, R]; b: LoraParam [N, R, d_out], both in ``param_dtype``.
      scale: LoraScale float32 [N], alpha / r (rsLoRA: alpha / sqrt(r)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_slots: int,
        max_rank: int,
        param_dtype: jnp.dtype,
    ):
        self.a = LoraParam(jnp.zeros((num_slots, in_features, max_rank), param_dtype))
        self.b = LoraParam(jnp.zeros((num_slots, max_rank, out_features), param_dtype))
        self.scale = LoraScale(jnp.zeros((num_slots,), jnp.float32))

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(a, b, scale)``, what the SMLM kernels take (``layers.project`` applies them)."""
        return self.a[...], self.b[...], self.scale[...]


def add_lora_tables(
    model: CausalLM,
    *,
    num_slots: int,
    max_rank: int,
    target_modules: Iterable[str] = tuple(TARGET_MODULES),
    param_dtype: jnp.dtype | None = None,
) -> None:
    """Gives every layer's targeted projections an empty ``LoraTable``, in place.

    Args:
      model: a model without tables yet.
      num_slots: N, adapters resident at once.
      max_rank: R, the largest adapter rank the tables hold.
      target_modules: projection names (keys of ``TARGET_MODULES``) that adapters may
        target; a smaller set saves memory and work.
      param_dtype: adapter weight dtype; default each projection's kernel dtype.

    Raises:
      ValueError: bad sizes, unknown projection names, or the model already has tables.
    """
    target_modules = tuple(target_modules)
    unknown = sorted(set(target_modules) - set(TARGET_MODULES))
    if unknown or not target_modules:
        raise ValueError(
            f"target_modules must be a non-empty subset of {', '.join(TARGET_MODULES)}; "
            f"got {list(target_modules)}"
        )
    if num_slots < 1 or max_rank < 1:
        raise ValueError(f"num_slots and max_rank must be >= 1, got {num_slots}, {max_rank}")
    if lora_tables(model):
        raise ValueError("the model already has LoRA tables")
    for layer in model.layers:
        for name in target_modules:
            linear = getattr(getattr(layer, TARGET_MODULES[name]), name)
            d_in, d_out = linear.kernel.shape
            linear.adapters = LoraTable(
                d_in,
                d_out,
                num_slots=num_slots,
                max_rank=max_rank,
                param_dtype=param_dtype or linear.kernel.dtype,
            )
    if model.mesh is not None:  # a model on a device mesh: place the new tables too
        sharding.shard_model(model, model.mesh)


def lora_tables(model: CausalLM) -> dict[ModuleKey, LoraTable]:
    """The model's tables by (layer, projection), in layer then ``TARGET_MODULES`` order."""
    return {
        (i, name): table
        for i, layer in enumerate(model.layers)
        for name, parent in TARGET_MODULES.items()
        if (table := getattr(getattr(layer, parent), name).adapters) is not None
    }
