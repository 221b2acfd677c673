"""Per-slot optax optimization of stacked adapter tables.

Every adapter param leaf has the slot axis first ([N, ...]). ``SlotOptimizer`` runs one
independent copy of an optax transformation per slot by ``jax.vmap`` over that axis, so
every optimizer state leaf, step counts and ``optax.inject_hyperparams`` hyperparameters
included, is per slot: each adapter has its own bias correction, schedule position,
learning rate, weight decay and gradient clipping (a global norm over that slot's params
across all tables).

Gradients arrive as gradients of each slot's *summed* token loss and accumulate over
micro-steps together with token counts; an update applies the accumulated sum divided by
the count, so k micro-steps equal one step on their union batch, the loss being the mean
over all of a slot's loss tokens. Slots change only where ``jnp.where`` on the slot axis
selects them: the params and state of every other slot stay bit-identical.

Nothing non-finite gets in: a micro-batch whose loss or gradient is NaN or infinite is
dropped for its slot, and an update that would make a slot's weights non-finite (a
learning rate that overflows them, a corrupted moment) is not applied; both are reported
per slot (``SlotUpdate.nonfinite``), the slot keeping its bits.

The state holds the tables stacked across layers (``LayerStacking``): a table's moments,
gradient sum and master copy for every layer are one array [N, L, ...], so neither the
update's kernels nor the jitted step's state arrays multiply with the layers. Per table of
every layer, the 8B shape's 448 tables took 18.1 ms of host time to launch the update
alone, against 0.7 ms stacked (``benchmarks/bench_optimizer_dispatch.py``, RESULTS.md run
50). The price is one copy of the gradients a step into the stacked layout. The
transformation sees one slot's stacked tables; elementwise and global-norm transformations
(AdamW, clipping) are unchanged by that.

Low-precision tables (bf16 adapters, computed in the base's dtype) keep a float32 master
copy in the optimizer state: the transformation updates the master, and the tables get
its rounding. Updating bf16 weights in place would lose every update below their 8-bit
mantissa's resolution (a 2e-5 learning rate moves a 0.01 weight by 0.2% of it: nothing).
Hyperparameters are float32 whatever the params' dtype (bf16 would round b2 = 0.999 to 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from loqjax.registry import write_slot
from loqjax.sharding import LAYER, key_name


def adamw(
    learning_rate: float | optax.Schedule = 1e-4,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """The default per-slot transformation: clip to a global norm, then AdamW.

    Every argument is a per-slot hyperparameter (see ``SlotOptimizer.set_hyperparams``);
    a schedule runs on each slot's own step count. ``max_grad_norm=inf`` disables clipping.
    """
    return optax.inject_hyperparams(_clipped_adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        b1=b1,
        b2=b2,
        eps=eps,
    )


def _clipped_adamw(learning_rate, weight_decay, max_grad_norm, b1, b2, eps):
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay),
    )


def slot_norms(tree) -> jax.Array:
    """float32 [N]: each slot's global L2 norm over every [N, ...] leaf of ``tree``."""
    squares = [
        jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(leaf.shape[0], -1), axis=1)
        for leaf in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares))


def slot_finite(tree) -> jax.Array:
    """bool [N]: every floating-point entry of slot i of every [N, ...] leaf is finite."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    finite = [jnp.all(jnp.isfinite(leaf).reshape(leaf.shape[0], -1), axis=1) for leaf in leaves]
    return functools.reduce(jnp.logical_and, finite)


def slot_where(mask: jax.Array, new, old):
    """Per leaf, slot i of ``new`` where ``mask[i]``, else of ``old`` (bool [N] mask)."""
    return jax.tree.map(
        lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (o.ndim - 1)), n, o), new, old
    )


@dataclasses.dataclass(frozen=True)
class LayerStacking:
    """How the leaves of a params tree stack into one array per table across layers.

    Leaves whose key paths differ only in integer keys (the layer index), with one shape
    and dtype, form a group, stacked along a new axis 1 in their flattening order. Its
    path is theirs with every integer key replaced by ``LAYER`` (a Variable's ``value``
    key dropped); a leaf with no integer key is a group of one. Stacked trees are nested
    dicts by those paths. Static: built from the tree's structure, at trace time.

    Attributes:
      treedef: the params' tree structure.
      groups: (path, indices into the params' leaves, dtype) of each group.
    """

    treedef: jax.tree_util.PyTreeDef
    groups: tuple[tuple[tuple, tuple[int, ...], np.dtype], ...]

    @classmethod
    def of(cls, params: optax.Params) -> LayerStacking:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        groups: dict[tuple, list[int]] = {}
        for i, (path, leaf) in enumerate(flat):
            names = tuple(
                LAYER if isinstance(name, int) else name
                for name in map(key_name, path)
                if name != "value"
            )
            groups.setdefault((names, np.shape(leaf), np.dtype(leaf.dtype)), []).append(i)
        paths = [names for names, _, _ in groups]
        if len(set(paths)) < len(paths):
            raise ValueError(
                "leaves that differ only in their layer index have different shapes or "
                f"dtypes; they cannot stack: {sorted(p for p in paths if paths.count(p) > 1)}"
            )
        return cls(
            treedef,
            tuple((names, tuple(idx), dtype) for (names, _, dtype), idx in groups.items()),
        )

    def _nested(self, values) -> dict:
        """{group path: value} as a nested dict."""
        tree: dict = {}
        for (names, _, _), value in zip(self.groups, values, strict=True):
            node = tree
            for name in names[:-1]:
                node = node.setdefault(name, {})
            node[names[-1]] = value
        return tree

    def stack(self, tree, dtype=None) -> dict:
        """The stacked groups of ``tree`` (shaped like the params): [N, G, ...] each, cast
        to ``dtype`` if given."""
        leaves = self.treedef.flatten_up_to(tree)
        groups = [jnp.stack([leaves[i] for i in indices], axis=1) for _, indices, _ in self.groups]
        return self._nested(groups if dtype is None else [g.astype(dtype) for g in groups])

    def cast(self, stacked: dict) -> dict:
        """``stacked`` with each group in its params' dtype."""
        dtypes = self._nested([dtype for _, _, dtype in self.groups])
        return jax.tree.map(lambda group, dtype: group.astype(dtype), stacked, dtypes)

    def unstack(self, stacked: dict):
        """The tree shaped like the params whose leaves are the slices of ``stacked``."""
        leaves = [None] * self.treedef.num_leaves
        for names, indices, _ in self.groups:
            group = functools.reduce(lambda node, name: node[name], names, stacked)
            for j, i in enumerate(indices):
                leaves[i] = group[:, j]
        return self.treedef.unflatten(leaves)


def _master_of(params: optax.Params) -> optax.Params | None:
    """A float32 copy of ``params`` if any leaf is of lower precision, else None."""
    if all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params)):
        return None
    return jax.tree.map(lambda p: p.astype(jnp.float32), params)


class SlotOptState(NamedTuple):
    """Optimizer state of N slots; every leaf has the slot axis first.

    Attributes:
      inner: the transformation's state of the stacked tables, one copy per slot.
      grad_sum: float32, the stacked tables' shapes (``LayerStacking``): gradient sums
        accumulated since the slot's last update.
      num_tokens: int32 [N], the loss tokens behind ``grad_sum``.
      master: float32 copy of the stacked tables when they are of low precision, which the
        transformation updates; None when every param is float32.
    """

    inner: optax.OptState
    grad_sum: optax.Params
    num_tokens: jax.Array
    master: optax.Params | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotUpdate:
    """What an update did to each slot; all [N].

    Attributes:
      updated: bool, the slot's params and state took a step.
      nonfinite: bool, the slot's loss or gradient in this micro-batch was NaN or
        infinite (that contribution was dropped), or its update would have made its
        weights non-finite (the update was not applied, and the slot's params and state
        are bit-identical to before the call).
      grad_norm: float32, global norm of the applied mean gradient (before clipping);
        0 where not updated.
    """

    updated: jax.Array
    nonfinite: jax.Array
    grad_norm: jax.Array


@dataclasses.dataclass(frozen=True)
class SlotOptimizer:
    """An optax transformation applied to each adapter slot independently.

    Attributes:
      tx: the per-slot transformation (sees one slot's params, without the slot axis).
        Build it with ``optax.inject_hyperparams`` (as ``adamw`` does) to make its
        hyperparameters settable per slot.
    """

    tx: optax.GradientTransformation = dataclasses.field(default_factory=adamw)

    def init(self, params: optax.Params) -> SlotOptState:
        """Fresh state for ``params`` (leaves [N, ...])."""
        stacked = LayerStacking.of(params).stack(params)
        grad_sum = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), stacked)
        num_slots = jax.tree.leaves(params)[0].shape[0]
        master = _master_of(stacked)
        return SlotOptState(
            jax.vmap(self.tx.init)(stacked if master is None else master),
            grad_sum,
            jnp.zeros((num_slots,), jnp.int32),
            master,
        )

    def unstacked(self, stacked: dict, params: optax.Params):
        """A stacked state tree (``grad_sum``, ``master``, a moment of ``inner``) as a tree
        shaped like ``params``, one leaf per table."""
        return LayerStacking.of(params).unstack(stacked)

    def update(
        self,
        params: optax.Params,
        state: SlotOptState,
        grads: optax.Updates,
        losses: jax.Array,
        num_tokens: jax.Array,
        apply: jax.Array,
    ) -> tuple[optax.Params, SlotOptState, SlotUpdate]:
        """Accumulates one micro-batch and steps the slots in ``apply`` that have tokens.

        A slot whose micro-batch loss or gradient is non-finite contributes nothing
        (reported in ``SlotUpdate.nonfinite``); if it has no earlier tokens either, it
        is not updated. A slot whose update would leave a non-finite weight is not
        updated either, and keeps its params and state bit-identical, this micro-batch
        dropped (also reported in ``nonfinite``). Pure and jittable.

        Args:
          params: leaves [N, ...].
          state: from ``init`` or an earlier update.
          grads: like ``params``: gradients of each slot's summed token loss.
          losses: float32 [N], each slot's summed token loss.
          num_tokens: int32 [N], each slot's loss tokens in this micro-batch.
          apply: bool [N], slots whose accumulated gradient is applied now; the others
            only accumulate.

        Returns:
          The new params and state, and what happened to each slot.
        """
        stacking = LayerStacking.of(params)
        grads = stacking.stack(grads, jnp.float32)
        present = num_tokens > 0
        nonfinite = present & ~(jnp.isfinite(losses) & jnp.isfinite(slot_norms(grads)))
        take = present & ~nonfinite
        # Where, not a masked add: x + 0.0 would turn -0.0 into +0.0.
        grad_sum = slot_where(take, jax.tree.map(jnp.add, state.grad_sum, grads), state.grad_sum)
        total = state.num_tokens + jnp.where(take, num_tokens, 0)
        ready = apply & (total > 0)

        denominator = jnp.maximum(total, 1).astype(jnp.float32)
        weights = stacking.stack(params) if state.master is None else state.master
        mean_grads = jax.tree.map(
            lambda s, p: (s / denominator.reshape((-1,) + (1,) * (s.ndim - 1))).astype(p.dtype),
            grad_sum,
            weights,
        )
        updates, inner = jax.vmap(self.tx.update)(mean_grads, state.inner, weights)
        stepped = optax.apply_updates(weights, updates)
        rounded = stacking.cast(stepped)
        # An update that overflows the weights (or comes from corrupt moments) is refused:
        # the slot keeps its bits, this micro-batch dropped as a non-finite one would be.
        # Only the weights are checked: some optax states hold infinities by design.
        overflow = ready & ~(slot_finite(stepped) & slot_finite(rounded))
        ready = ready & ~overflow
        grad_sum = slot_where(overflow, state.grad_sum, grad_sum)
        total = jnp.where(overflow, state.num_tokens, total)
        new_weights = slot_where(ready, stepped, weights)
        if state.master is None:
            new_params, master = stacking.unstack(new_weights), None
        else:
            new_params = slot_where(ready, stacking.unstack(rounded), params)
            master = new_weights
        new_state = SlotOptState(
            slot_where(ready, inner, state.inner),
            slot_where(ready, jax.tree.map(jnp.zeros_like, grad_sum), grad_sum),
            jnp.where(ready, 0, total),
            master,
        )
        grad_norm = jnp.where(ready, slot_norms(mean_grads), 0.0)
        return new_params, new_state, SlotUpdate(ready, nonfinite | overflow, grad_norm)

    def set_hyperparams(self, state: SlotOptState, slot: int, **values: float) -> SlotOptState:
        """Sets hyperparameters of one slot (``tx`` must be ``optax.inject_hyperparams``).

        Host-side, between steps; ``state`` is donated. A hyperparameter given as a
        schedule is recomputed from the slot's step count at every update.

        Raises:
          KeyError: a name that is not a hyperparameter of ``tx``.
          ValueError: a value that is not a real number, NaN, or finite but infinite in
            the hyperparameter's dtype (1e39 overflows float32; ``inf`` itself is allowed:
            ``adamw(max_grad_norm=inf)`` disables clipping).
        """
        self.check_hyperparams(state, values)
        if not values:
            return state
        hyperparams = state.inner.hyperparams
        names = sorted(values)
        current = {name: hyperparams[name] for name in names}
        new = write_slot(
            current,
            np.int32(slot),
            {name: np.asarray(values[name], current[name].dtype) for name in names},
        )
        inner = state.inner._replace(hyperparams={**hyperparams, **new})
        return state._replace(inner=inner)

    def check_hyperparams(self, state: SlotOptState, values: dict[str, float]) -> None:
        """Raises what ``set_hyperparams`` would for ``values``, writing nothing (no
        values: nothing to check, whatever the transformation)."""
        if not values:
            return
        hyperparams = getattr(state.inner, "hyperparams", None)
        if hyperparams is None:
            raise KeyError(
                f"hyperparameters {sorted(values)} given, but the optimizer has none: build "
                "its transformation with optax.inject_hyperparams"
            )
        unknown = sorted(set(values) - set(hyperparams))
        if unknown:
            raise KeyError(f"unknown hyperparameters {unknown}; known: {sorted(hyperparams)}")
        for name, value in values.items():
            real = isinstance(value, int | float | np.integer | np.floating)
            if isinstance(value, bool) or not real or math.isnan(value):
                raise ValueError(f"hyperparameter {name}={value!r} is not a number")
            dtype = hyperparams[name].dtype
            with np.errstate(over="ignore"):
                cast = np.asarray(value, dtype)
            if math.isfinite(value) and not np.isfinite(cast):
                raise ValueError(f"hyperparameter {name}={value!r} overflows {dtype}")

    def reset_slot(self, state: SlotOptState, params: optax.Params, slot: int) -> SlotOptState:
        """Restarts one slot from a fresh ``tx.init`` (step count 0, default
        hyperparameters, nothing accumulated), e.g. when it gets a new adapter.

        Host-side, between steps; ``state`` is donated.
        """
        weights = jax.tree.map(lambda p: p[slot], LayerStacking.of(params).stack(params))
        master = None if state.master is None else _master_of(weights)
        fresh = self.tx.init(weights if master is None else master)
        grad_sum = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), state.grad_sum)
        return write_slot(state, np.int32(slot), SlotOptState(fresh, grad_sum, np.int32(0), master))
