"""Which base model an adapter belongs to: its architecture and a fingerprint of its weights."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from loqjax.config import ModelConfig
from loqjax.lora import BASE_PARAMS, TARGET_MODULES
from loqjax.model import CausalLM

# Elements sampled from each base tensor; any fine-tune of the base changes almost all.
_SAMPLES_PER_TENSOR = 64


@dataclasses.dataclass(frozen=True)
class BaseModelId:
    """Identifies a base model, so an adapter is never applied to a base it was not made for.

    Attributes:
      config: the architecture.
      fingerprint: sha256 hex digest of every base tensor's name, shape and a strided
        sample of its values rounded to bfloat16, so the same weights loaded in float32
        or bfloat16 give the same id.
    """

    config: ModelConfig
    fingerprint: str

    @classmethod
    def of(cls, model: CausalLM) -> BaseModelId:
        """The id of ``model``'s frozen weights (its adapter tables, if any, are ignored)."""
        digest = hashlib.sha256()
        for path, variable in nnx.to_flat_state(nnx.state(model, BASE_PARAMS)):
            flat = jnp.ravel(variable[...])
            stride = max(1, flat.size // _SAMPLES_PER_TENSOR)
            sample = np.asarray(flat[::stride][:_SAMPLES_PER_TENSOR].astype(jnp.bfloat16))
            digest.update(f"{'.'.join(map(str, path))}{variable.shape}".encode())
            digest.update(sample.tobytes())
        return cls(model.config, digest.hexdigest())

    def to_json(self) -> dict:
        return {"config": _config_json(self.config), "fingerprint": self.fingerprint}

    def mismatch(self, saved: object) -> str | None:
        """What differs between this id and ``saved`` (a ``to_json`` dict read back from
        disk), or None if they are the same base."""
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            return f"malformed base model record {saved!r}"
        config, ours = saved["config"], _config_json(self.config)
        differ = [
            f"{key}={config.get(key)!r} (this base: {ours.get(key)!r})"
            for key in sorted(set(config) | set(ours))
            if config.get(key) != ours.get(key)
        ]
        if differ:
            return f"it was saved for another architecture: {', '.join(differ)}"
        if saved.get("fingerprint") != self.fingerprint:
            return (
                f"it was saved for another base model with the same architecture "
                f"(weights fingerprint {str(saved.get('fingerprint'))[:12]}…, this base "
                f"{self.fingerprint[:12]}…)"
            )
        return None

    @property
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Projection name -> (d_in, d_out) of its kernel, for every ``TARGET_MODULES`` name."""
        return _projection_shapes(self.config)


def _config_json(config: ModelConfig) -> dict:
    """``config`` as plain JSON values, as a JSON round trip gives them back."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


@functools.cache
def _projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    abstract = nnx.eval_shape(lambda: CausalLM(config, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    layer = abstract.layers[0]
    return {
        name: tuple(getattr(getattr(layer, parent), name).kernel.shape)
        for name, parent in TARGET_MODULES.items()
    }
