"""Host-side LoRA adapters and the errors raised when one cannot be used."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from loqjax.lora import TARGET_MODULES, ModuleKey


class AdapterError(ValueError):
    """An adapter cannot be loaded, found or read; nothing was changed."""


class UnknownAdapterError(AdapterError):
    """No adapter of that name is loaded."""


class DuplicateAdapterError(AdapterError):
    """An adapter of that name is already loaded (use ``replace``)."""


class TableFullError(AdapterError):
    """Every slot of the adapter tables is taken."""


class RankError(AdapterError):
    """The adapter's rank is not in [1, max_rank] of the tables."""


class TargetModuleError(AdapterError):
    """The adapter targets a projection the tables do not hold."""


class ShapeMismatchError(AdapterError):
    """The adapter's weights do not fit the base model (layers or projection sizes)."""


class InvalidAdapterError(AdapterError):
    """Not a ``LoraAdapter``, or its alpha or weights are unusable: weights must be finite
    floating-point arrays, alpha a finite number."""


class PeftFormatError(AdapterError):
    """A PEFT adapter directory is malformed or uses an unsupported option."""


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter in host memory, in JAX layout.

    The adapter adds ``scale * (x @ A) @ B`` to every projection it targets.

    Attributes:
      rank: r, the inner width of every A and B.
      alpha: lora_alpha.
      weights: (layer, projection name) -> (A [d_in, r], B [r, d_out]), numpy arrays
        (any float dtype, bfloat16 included); a targeted projection has an entry for
        every layer.
      use_rslora: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    """

    rank: int
    alpha: float
    weights: Mapping[ModuleKey, tuple[np.ndarray, np.ndarray]]
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The projections with weights, in ``TARGET_MODULES`` order (unknown names last)."""
        names = {name for _, name in self.weights}
        known = [name for name in TARGET_MODULES if name in names]
        return (*known, *sorted(names - set(known)))
