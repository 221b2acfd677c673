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

Serving: with a paged KV cache (``loqjax.kv_cache``), segment ids index the rows of the
step's page tables, positions are positions in the cache, and each layer writes its keys
and values to the cache before attending over its sequences' cached pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from loqjax.attention import paged_attention, reference_attention
from loqjax.config import ModelConfig
from loqjax.layers import Embedding, Linear, RMSNorm
from loqjax.rope import apply_rope, rope_cos_sin

if TYPE_CHECKING:
    from loqjax.kv_cache import KVCache, LayerKV, PageBatch
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
        kv: LayerKV | None = None,
        pages: PageBatch | None = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        """x [T, d], cos/sin float32 [T, head_dim], positions/segment_ids int32 [T].

        Returns [T, d] and, given this layer's cache ``kv`` and the batch's ``pages``,
        the cache with this batch's keys and values written (else None).
        """
        t = x.shape[0]
        q = self.q_proj(x, lora).reshape(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, lora).reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, lora).reshape(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            out = reference_attention(
                q, k, v, positions, positions, segment_ids, segment_ids, self.sliding_window
            )
        else:
            kv = kv.write(k, v, pages.slots)
            out = paged_attention(
                q, kv, pages.page_tables, positions, segment_ids, self.sliding_window
            )
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim), lora), kv


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

    def __call__(self, x, cos, sin, positions, segment_ids, lora=None, kv=None, pages=None):
        """Same arguments and results as ``Attention.__call__``."""
        h, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, positions, segment_ids, lora, kv, pages
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), lora), kv


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
        *,
        cache: KVCache | None = None,
        pages: PageBatch | None = None,
        logit_rows: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits of a packed batch (see the module docstring for the packing rules).

        Args:
          tokens: int32 [T], ids in [0, vocab); padding may use any valid id.
          positions: int32 [T], index of each token within its sequence.
          segment_ids: int32 [T], >= 0 for real tokens, -1 for padding.
          lora: adapter slot of each token, or None for the base model alone.
          cache: a paged KV cache to extend and attend over, one ``LayerKV`` per layer;
            every earlier position of each sequence must already be in it.
          pages: where this batch reads and writes ``cache``; required with it.
          logit_rows: int32 [R]: compute only these rows' logits, e.g. each sequence's
            last token when serving.

        Returns:
          float32 [T, vocab] next-token logits ([R, vocab] with ``logit_rows``); with a
          cache, also the cache with this batch's keys and values written.
        """
        if (cache is None) != (pages is None):
            raise ValueError("a KV cache and its pages must be passed together")
        cos, sin = rope_cos_sin(positions, self.config)
        x = self.embed_tokens(tokens)
        layer_kvs = (None,) * len(self.layers) if cache is None else cache
        new_cache = []
        for layer, kv in zip(self.layers, layer_kvs, strict=True):
            x, kv = layer(x, cos, sin, positions, segment_ids, lora, kv, pages)
            new_cache.append(kv)
        if logit_rows is not None:
            x = x[logit_rows]
        x = self.norm(x)
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = head.attend(x)
        return logits if cache is None else (logits, tuple(new_cache))
