"""Rotary position embeddings in Hugging Face's "rotate_half" layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from loqjax.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies, float32 [head_dim // 2]; a trace-time constant.

    Mirrors transformers' default and ``_compute_llama3_parameters`` op for op in float32,
    matching them to within an ulp (``pow`` implementations differ).
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq

    factor = np.float32(scaling.factor)
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for ``apply_rope``.

    Args:
      positions: int32 [T], position of each token within its sequence.

    Returns:
      (cos, sin), each float32 [T, head_dim]; both halves of the last axis repeat the
      same angles, as in HF.
    """
    angles = positions.astype(jnp.float32)[:, None] * rope_inv_freq(config)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [T, H, D] by the angles in cos/sin [T, D]; computes in x.dtype like HF."""
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
