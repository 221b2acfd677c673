"""Llama-family decoder (Llama, Mistral, Qwen2) over packed token batches, in Flax NNX.

Submodule and projection names follow Hugging Face (``layers[i].self_attn.q_proj`` ...),
so checkpoint names map onto parameter paths mechanically.

Packed batches: several sequences are concatenated along one token axis with no padding
between them. ``segment_ids`` tells them apart and ``positions`` gives each token's index
in its own sequence; token i attends to token j iff they share a segment id and
``positions[j] <= positions[i]`` (within the sliding window, if any). A fixed-capacity
batch is filled up with padding tokens of segment id -1: they never exchange information
with real tokens, and their own logits are finite garbage that callers must ignore.

LoRA adapters: with tables added by ``loqjax.lora.add_lora_tables``, an optional
``LoraBatch`` picks each token's adapter slot; it is passed down unchanged to every
projection (``Linear``), the only place that reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from loqjax.attention import reference_attention
from loqjax.config import ModelConfig
from loqjax.layers import Embedding, Linear, RMSNorm
from loqjax.rope import apply_rope, rope_cos_sin

if TYPE_CHECKING:
    from loqjax.lora import LoraBatch


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, config: ModelConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        qkv = dict(use_bias=config.attention_bias, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, config.num_heads * hd, **qkv)
        self.k_proj = Linear(d, config.num_kv_heads * hd, **qkv)
        self.v_proj = Linear(d, config.num_kv_heads * hd, **qkv)
        self.o_proj = Linear(config.num_heads * hd, d, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = hd
        self.sliding_window = config.sliding_window

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        lora: LoraBatch | None = None,
    ) -> jax.Array:
        """x [T, d], cos/sin float32 [T, head_dim], positions/segment_ids int32 [T] -> [T, d]."""
        t = x.shape[0]
        q = self.q_proj(x, lora).reshape(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, lora).reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, lora).reshape(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = reference_attention(
            q, k, v, positions, positions, segment_ids, segment_ids, self.sliding_window
        )
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim), lora)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, param_dtype=param_dtype, rngs=rngs)
        self.up_proj = Linear(d, f, param_dtype=param_dtype, rngs=rngs)
        self.down_proj = Linear(f, d, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, lora: LoraBatch | None = None) -> jax.Array:
        """x [T, d] -> [T, d]."""
        h = jax.nn.silu(self.gate_proj(x, lora)) * self.up_proj(x, lora)
        return self.down_proj(h, lora)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: ModelConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, positions, segment_ids, lora=None):
        """Same arguments and shapes as ``Attention.__call__``; returns [T, d]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, segment_ids, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class CausalLM(nnx.Module):
    """Decoder-only language model; computes in ``param_dtype`` and returns float32 logits."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        init = dict(param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, **init)
        self.layers = nnx.List([DecoderLayer(config, **init) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        # HF stores lm_head.weight as [vocab, d], the embedding layout: no transpose either way.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Embedding(config.vocab_size, config.hidden_size, **init)
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        lora: LoraBatch | None = None,
    ) -> jax.Array:
        """Logits of a packed batch (see the module docstring for the packing rules).

        Args:
          tokens: int32 [T], ids in [0, vocab); padding may use any valid id.
          positions: int32 [T], index of each token within its sequence.
          segment_ids: int32 [T], >= 0 for real tokens, -1 for padding.
          lora: adapter slot of each token, or None for the base model alone.

        Returns:
          float32 [T, vocab] next-token logits.
        """
        cos, sin = rope_cos_sin(positions, self.config)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, segment_ids, lora)
        x = self.norm(x)
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head.attend(x)
