"""Flat array trees: dotted path ("layers.0.q_proj.a") -> array, and their checks.

Checkpoints store arrays as nested dicts of plain names, so any pytree (an optax state
of NamedTuples, an ``nnx.State``) is saved by its key paths and rebuilt from a template
of the same structure; comparing paths, shapes and dtypes before reading anything is
how a mismatched checkpoint is caught.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from loqjax.sharding import key_name

FlatArrays = dict[str, np.ndarray]
# Dotted path -> (shape, dtype); a dtype of None stands for any float dtype.
Specs = dict[str, tuple[tuple[int, ...], np.dtype | None]]


def flatten_pytree(tree) -> dict:
    """Dotted key path -> leaf of every leaf of ``tree``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_dotted(path): leaf for path, leaf in leaves}


def unflatten_like(flat: Mapping, template):
    """The pytree of ``template``'s structure whose leaves are ``flat[path]``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[_dotted(path)] for path, _ in leaves])


def specs_of(flat: Mapping) -> Specs:
    """Path -> (shape, dtype) of arrays or ``jax.ShapeDtypeStruct``s."""
    return {path: (tuple(x.shape), np.dtype(x.dtype)) for path, x in flat.items()}


def check_specs(found: Specs, wanted: Specs) -> str | None:
    """What is wrong with arrays ``found`` against ``wanted``, or None: missing and
    unexpected paths first, then the first wrong shape or dtype."""
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing or extra:
        return f"missing arrays: {_names(missing)}; unexpected arrays: {_names(extra)}"
    for path, (shape, dtype) in wanted.items():
        got_shape, got_dtype = found[path]
        if got_shape != shape:
            return f"array {path} has shape {got_shape}, expected {shape}"
        if dtype is None and not jnp.issubdtype(got_dtype, jnp.floating):
            return f"array {path} has dtype {got_dtype}, expected a float dtype"
        if dtype is not None and got_dtype != dtype:
            return f"array {path} has dtype {got_dtype}, expected {dtype}"
    return None


def nest(flat: Mapping) -> dict:
    """{"a.b": x} -> {"a": {"b": x}}."""
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"a.b": x}, the inverse of ``nest``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _names(paths: list[str], limit: int = 4) -> str:
    if not paths:
        return "none"
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _dotted(path: tuple) -> str:
    parts = []
    for key in path:
        part = str(key_name(key))
        if "." in part or not part:
            raise ValueError(f"pytree key {part!r} cannot be a checkpoint path component")
        parts.append(part)
    return ".".join(parts)
