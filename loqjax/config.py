"""Static architecture description of a Llama-family decoder (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import dataclasses
import os

from transformers import AutoConfig, PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 RoPE frequency rescaling (transformers' ``rope_type="llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    Frozen and hashable, so it can live in a module's static structure and key jit caches.

    Attributes:
      attention_bias: q/k/v projections carry a bias (Qwen2); o_proj never does.
      sliding_window: if set, query at position p only sees keys at positions in
        (p - sliding_window, p] (Mistral); applies to every layer.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    @classmethod
    def from_hf(cls, source: str | os.PathLike | PretrainedConfig) -> ModelConfig:
        """Reads a Hugging Face config (a local checkpoint directory or a config object).

        Raises:
          ValueError: the model type, activation, RoPE variant or attention layout is not
            one this decoder implements.
        """
        hf = (
            source
            if isinstance(source, PretrainedConfig)
            else AutoConfig.from_pretrained(source, local_files_only=True)
        )
        model_type = hf.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}")
        if hf.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hf.hidden_act!r}; only 'silu' (SwiGLU)")
        if model_type == "llama" and (hf.attention_bias or hf.mlp_bias):
            raise ValueError("llama configs with attention_bias or mlp_bias are not supported")

        rope_theta, rope_scaling = _rope_from_hf(hf)
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            attention_bias=model_type == "qwen2",
            max_position_embeddings=hf.max_position_embeddings,
            sliding_window=_sliding_window_from_hf(hf),
        )


def _rope_from_hf(hf: PretrainedConfig) -> tuple[float, Llama3RopeScaling | None]:
    params = hf.rope_parameters or {"rope_type": "default"}
    if "rope_type" not in params:
        raise ValueError(f"unsupported per-layer rope_parameters {params!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    theta = float(params.get("rope_theta", getattr(hf, "default_theta", 10000.0)))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, llama3")


def _sliding_window_from_hf(hf: PretrainedConfig) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if hf.model_type != "qwen2" or window is None:
        return window
    # Qwen2 windows only the layers marked "sliding_attention"; we window all or none.
    layer_types = set(hf.layer_types)
    if layer_types == {"full_attention"}:
        return None
    if layer_types == {"sliding_attention"}:
        return window
    raise ValueError("qwen2 configs mixing sliding and full attention layers are not supported")
