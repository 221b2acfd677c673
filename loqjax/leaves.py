"""Pytrees that cross a jit boundary as flat lists of arrays.

A jitted call flattens its arguments and rebuilds its results on every call: C++ work
for a list of arrays, Python work for an ``nnx.State`` (microseconds a leaf). For the
Llama-3-8B shape with 64-slot adapter tables on all seven projections that is, on one
CPU core, ~2.4 ms to flatten the frozen base (515 leaves) and ~13 ms to flatten plus
~45 ms to rebuild a ``TrainState`` (2249 leaves), every step, the device idle meanwhile.
So the hot steps take and return leaves, their structure fixed when they are made
(``with_leaves``): the engine reads its variables' values as a list, the runtime holds
its states as ``Leaves``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.tree_util import PyTreeDef


class Leaves:
    """A pytree held as its leaves, what the steps take and return; the tree itself is
    rebuilt only when asked for (``tree``)."""

    def __init__(self, treedef: PyTreeDef, leaves: Sequence[Any]):
        assert len(leaves) == treedef.num_leaves, (len(leaves), treedef.num_leaves)
        self.treedef = treedef
        self.leaves = list(leaves)

    @classmethod
    def of(cls, tree: Any) -> Leaves:
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, leaves)

    @functools.cached_property
    def tree(self) -> Any:
        return jax.tree.unflatten(self.treedef, self.leaves)


def with_leaves(
    fn: Callable,
    treedefs: Sequence[PyTreeDef | None],
    leaf_results: Mapping[int, PyTreeDef] | None = None,
) -> Callable:
    """``fn`` whose argument ``i`` arrives as the leaves of ``treedefs[i]`` (None: as
    is), and whose result ``i`` (of its result tuple), for each key of ``leaf_results``,
    leaves as its leaves, its structure checked against ``leaf_results[i]`` at trace
    time: the function to jit."""
    leaf_results = leaf_results or {}

    def call(*args):
        args = [
            arg if treedef is None else jax.tree.unflatten(treedef, arg)
            for arg, treedef in zip(args, treedefs, strict=True)
        ]
        results = list(fn(*args))
        for i, treedef in leaf_results.items():
            leaves, structure = jax.tree.flatten(results[i])
            assert structure == treedef, f"result {i}: {structure} is not {treedef}"
            results[i] = leaves
        return tuple(results)

    return call
