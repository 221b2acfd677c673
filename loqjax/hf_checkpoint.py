"""Loads Hugging Face safetensors checkpoints (single file or sharded) into ``CausalLM``.

No torch: tensors are read with ``safe_open(framework="flax")``, which also decodes
bfloat16, a dtype numpy cannot represent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from loqjax.config import ModelConfig
from loqjax.model import CausalLM
from pallas_kernels.platform import KernelImpl

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Leaf parameter name -> HF tensor suffix. Only `kernel` is stored transposed.
_HF_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or does not match its config."""


def load_model(
    path: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    *,
    kernels: KernelImpl = "auto",
) -> tuple[ModelConfig, CausalLM]:
    """Builds a ``CausalLM`` from a local HF checkpoint directory.

    Args:
      path: directory with ``config.json`` and either ``model.safetensors`` or
        ``model.safetensors.index.json`` plus its shards.
      dtype: parameter (and compute) dtype, e.g. ``jnp.float32`` or ``jnp.bfloat16``;
        checkpoint tensors are cast to it whatever their stored dtype.
      kernels: see ``CausalLM``.

    Raises:
      CheckpointError: missing config or shard file, missing, unexpected or
        wrongly shaped tensor; the message names it.
      ValueError: the architecture is not supported (see ``ModelConfig.from_hf``).
    """
    path = Path(path)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be floating, got {dtype}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json")
    config = ModelConfig.from_hf(path)

    abstract = nnx.eval_shape(
        lambda: CausalLM(config, param_dtype=dtype, rngs=nnx.Rngs(0), kernels=kernels)
    )
    graphdef, state = nnx.split(abstract)
    params = {hf_tensor_name(p): (p, var) for p, var in nnx.to_flat_state(state)}
    expected = {name: _hf_shape(p, var.shape) for name, (p, var) in params.items()}
    tensors = _read_tensors(path, expected, harmless=lambda name: _is_harmless(name, config))
    loaded = [
        (p, var.replace(_to_param(tensors[name], p, dtype))) for name, (p, var) in params.items()
    ]
    return config, nnx.merge(graphdef, nnx.from_flat_state(loaded))


def hf_tensor_name(param_path: tuple) -> str:
    """HF tensor name of a ``CausalLM`` parameter path, e.g.

    ``("layers", 0, "self_attn", "q_proj", "kernel")``
    -> ``"model.layers.0.self_attn.q_proj.weight"``.
    """
    *modules, leaf = param_path
    prefix = "" if modules[0] == "lm_head" else "model."
    return prefix + ".".join(map(str, modules)) + "." + _HF_LEAF_NAMES[leaf]


def _read_tensors(
    path: Path,
    expected: Mapping[str, tuple[int, ...]],
    harmless: Callable[[str], bool],
) -> dict[str, jax.Array]:
    """Reads exactly the ``expected`` tensors (name -> HF shape), in their stored dtype.

    Shapes are checked from the safetensors headers before any data is read. Tensors
    present in the checkpoint but not expected are an error unless ``harmless(name)``.
    """
    locations = _tensor_locations(path)
    missing = sorted(set(expected) - set(locations))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing)}")
    unexpected = sorted(n for n in set(locations) - set(expected) if not harmless(n))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unexpected)}")

    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(locations[name], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        with safe_open(path / file, framework="flax") as f:
            present = set(f.keys())
            for name in file_names:
                if name not in present:
                    raise CheckpointError(
                        f"{path / file}: missing tensor {name} (listed in {INDEX_FILE})"
                    )
                got = tuple(f.get_slice(name).get_shape())
                if got != expected[name]:
                    raise CheckpointError(
                        f"{path / file}: tensor {name} has shape {got}, expected {expected[name]}"
                    )
                tensors[name] = f.get_tensor(name)
    return tensors


def _tensor_locations(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file (relative to ``path``), from the index or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from e
        absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if absent:
            raise CheckpointError(f"{path}: missing shard file(s) {', '.join(absent)}")
        return weight_map
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="flax") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}")


def _is_harmless(name: str, config: ModelConfig) -> bool:
    """Extra tensors some exporters write that carry nothing we need: RoPE tables are
    recomputed, and a tied output head is the embedding."""
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight"
    )


def _hf_shape(param_path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if param_path[-1] == "kernel" else tuple(shape)


def _to_param(tensor: jax.Array, param_path: tuple, dtype: jnp.dtype) -> jax.Array:
    tensor = tensor.astype(dtype)
    return tensor.T if param_path[-1] == "kernel" else tensor
