"""A LoRA adapter as a checkpoint record: a JSON config and its A/B arrays.

The arrays are a flat tree ``layers.<i>.<projection>.a`` [d_in, r] and ``.b`` [r, d_out],
one pair per layer of every targeted projection, in the adapter's dtype. The config
holds rank, alpha, use_rslora, target_modules, the scale they imply (for readers of the
JSON; it is checked, never trusted) and the base model's id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from loqjax.adapter import LoraAdapter, RankError, ShapeMismatchError, TargetModuleError
from loqjax.ckpt.base_model import BaseModelId
from loqjax.ckpt.tree import FlatArrays, Specs, check_specs, specs_of
from loqjax.lora import TARGET_MODULES


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What an adapter computes besides its weights (see ``LoraAdapter``)."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        return LoraAdapter(self.rank, self.alpha, {}, self.use_rslora).scale

    def adapter(self, weights: FlatArrays, base: BaseModelId) -> LoraAdapter:
        """The adapter of ``weights``, arrays already checked against ``array_specs``."""
        pairs = _pairs(self, base.config.num_layers)
        return LoraAdapter(
            self.rank,
            self.alpha,
            {(layer, name): (weights[f"{p}.a"], weights[f"{p}.b"]) for layer, name, p in pairs},
            self.use_rslora,
        )

    def array_specs(self, base: BaseModelId) -> Specs:
        """Path -> (shape, None: any float dtype) of the arrays an adapter of this config
        has on ``base``."""
        shapes = base.projection_shapes
        specs: Specs = {}
        for _, name, prefix in _pairs(self, base.config.num_layers):
            d_in, d_out = shapes[name]
            specs[f"{prefix}.a"] = ((d_in, self.rank), None)
            specs[f"{prefix}.b"] = ((self.rank, d_out), None)
        return specs


def encode(adapter: LoraAdapter, base: BaseModelId) -> tuple[dict, FlatArrays]:
    """(JSON config, host copies of the arrays) of ``adapter``, which must fit ``base``.

    Raises:
      RankError, TargetModuleError, ShapeMismatchError: it does not fit ``base``.
    """
    if adapter.rank < 1:
        raise RankError(f"adapter rank {adapter.rank} is not positive")
    unknown = [name for name in adapter.target_modules if name not in TARGET_MODULES]
    if unknown or not adapter.target_modules:
        raise TargetModuleError(
            f"adapter targets {list(adapter.target_modules)}; projections are "
            f"{', '.join(TARGET_MODULES)}"
        )
    config = AdapterConfig(
        adapter.rank, float(adapter.alpha), bool(adapter.use_rslora), adapter.target_modules
    )
    # Copies: the write runs in the background, and the caller may reuse its buffers.
    arrays = {}
    for (layer, name), (a, b) in adapter.weights.items():
        arrays[f"layers.{layer}.{name}.a"] = np.array(a)
        arrays[f"layers.{layer}.{name}.b"] = np.array(b)
    problem = check_specs(specs_of(arrays), config.array_specs(base))
    if problem:
        raise ShapeMismatchError(f"the adapter does not fit the base model: {problem}")
    record = {**dataclasses.asdict(config), "scale": config.scale, "base": base.to_json()}
    return record, arrays


def decode_config(
    record: object, base: BaseModelId, fail: Callable[[str], Exception]
) -> AdapterConfig:
    """The config of a record written by ``encode``, checked for ``base``.

    Raises:
      ``fail(problem)``: a field is missing, the record is of another base model, a
      field is ill-typed, or the scale does not follow from rank and alpha.
    """
    if not isinstance(record, Mapping):
        raise fail(f"adapter record {record!r} is not a JSON object")
    fields = ("rank", "alpha", "use_rslora", "target_modules", "scale", "base")
    missing = [field for field in fields if field not in record]
    if missing:
        raise fail(f"adapter record lacks {', '.join(missing)}")
    mismatch = base.mismatch(record["base"])
    if mismatch:
        raise fail(mismatch)
    rank, alpha, targets = record["rank"], record["alpha"], record["target_modules"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise fail(f"rank={rank!r} is not a positive integer")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise fail(f"alpha={alpha!r} is not a number")
    if not isinstance(record["use_rslora"], bool):
        raise fail(f"use_rslora={record['use_rslora']!r} is not a boolean")
    if (
        not isinstance(targets, list)
        or not targets
        or any(name not in TARGET_MODULES for name in targets)
    ):
        raise fail(f"target_modules={targets!r} is not a list of {', '.join(TARGET_MODULES)}")
    config = AdapterConfig(rank, float(alpha), record["use_rslora"], tuple(targets))
    if record["scale"] != config.scale:
        raise fail(
            f"scale={record['scale']!r} does not follow from rank and alpha ({config.scale!r})"
        )
    return config


def _pairs(config: AdapterConfig, num_layers: int):
    """(layer, projection, array path prefix) of every A/B pair, layer-major."""
    for layer in range(num_layers):
        for name in config.target_modules:
            yield layer, name, f"layers.{layer}.{name}"
