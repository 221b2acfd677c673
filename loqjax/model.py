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
and values to the cache before attending over its sequences' cached pages. A unified batch
puts ``num_train_rows`` training rows first: they attend among themselves (packed, as
without a cache) and never touch the cache, and they alone are differentiated.

Attention and the adapter terms run on the Pallas kernels on a GPU and on the plain-jnp
references elsewhere (``kernels``; see ``pallas_kernels.platform.use_kernels``: off GPU the
kernels only run interpreted, for tests). Each decoder layer is its own nested
``jax.jit`` with static structure, so the 32 layers of an 8B model are traced, lowered and
their kernels compiled once rather than once per layer.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from loqjax import parallel
from loqjax.attention import cached_attention, packed_attention
from loqjax.config import ModelConfig
from loqjax.layers import Embedding, Linear, RMSNorm, project
from loqjax.loss import head_token_losses
from loqjax.rope import apply_rope, rope_cos_sin
from pallas_kernels.platform import KernelImpl, use_kernels

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from loqjax.kv_cache import KVCache, LayerKV, PageBatch
    from loqjax.lora import LoraBatch


# A decoder layer's submodules and their projections (``Linear``), by HF name.
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        kernels: KernelImpl = "auto",
    ):
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
        self.kernels = kernels
        # Static: the device mesh of a model placed by ``loqjax.sharding.shard_model``.
        self.mesh: Mesh | None = None

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
        num_train_rows: int = 0,
    ) -> tuple[jax.Array, LayerKV | None]:
        """x [T, d], cos/sin float32 [T, head_dim], positions/segment_ids int32 [T].

        Returns [T, d] and, given this layer's cache ``kv`` and the batch's ``pages``,
        the cache with the keys and values of rows [num_train_rows, T) written (else
        None); rows [0, num_train_rows) attend among themselves only.
        """
        t, n = x.shape[0], num_train_rows
        q, k, v = project([self.q_proj, self.k_proj, self.v_proj], x, lora)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        impl = dict(sliding_window=self.sliding_window, impl=self.kernels)
        if self.mesh is None:
            attend = functools.partial(packed_attention, **impl)
        else:  # each device with its own heads
            attend = functools.partial(parallel.packed_attention, self.mesh, **impl)
        if kv is None:
            out = attend(q, k, v, positions, segment_ids)
        else:
            # Serving rows are never differentiated: cut them off before the cache and
            # the (forward-only) paged kernel.
            q_s, k_s, v_s = (jax.lax.stop_gradient(a[n:]) for a in (q, k, v))
            serve = (pages.page_tables, positions[n:], segment_ids[n:])
            if self.mesh is None:
                kv = kv.write(k_s, v_s, pages.slots[n:])
                out = cached_attention(q_s, kv, *serve, **impl)
            else:
                kv, out = parallel.write_and_attend(
                    self.mesh, q_s, k_s, v_s, kv, pages.slots[n:], *serve, **impl
                )
            if n:
                train = attend(q[:n], k[:n], v[:n], positions[:n], segment_ids[:n])
                out = jnp.concatenate([train, out])
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
        gate, up = project([self.gate_proj, self.up_proj], x, lora)
        h = jax.nn.silu(gate) * up
        return self.down_proj(h, lora)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        kernels: KernelImpl = "auto",
    ):
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, param_dtype=param_dtype, rngs=rngs, kernels=kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x, cos, sin, positions, segment_ids, lora=None, kv=None, pages=None, num_train_rows=0
    ):
        """Same arguments and results as ``Attention.__call__``."""
        h, kv = self.self_attn(
            self.input_layernorm(x),
            cos,
            sin,
            positions,
            segment_ids,
            lora,
            kv,
            pages,
            num_train_rows,
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), lora), kv


def apply_layer(layer: DecoderLayer, *args, num_train_rows: int = 0):
    """``layer(*args, num_train_rows=...)`` as a nested jit of the layer's pure function.

    Every layer of a model has the same structure (graphdef) and shapes, so JAX traces
    and lowers the layer once and calls the one lowered function per layer; Pallas kernels
    inside are lowered (and compiled by Triton) once instead of once per layer.
    """
    graphdef, state = nnx.split(layer)
    return _pure_layer(graphdef, num_train_rows, state, *args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pure_layer(graphdef, num_train_rows, state, *args):
    return nnx.merge(graphdef, state)(*args, num_train_rows=num_train_rows)


class CausalLM(nnx.Module):
    """Decoder-only language model; computes in ``param_dtype`` and returns float32 logits."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
        kernels: KernelImpl = "auto",
    ):
        """
        Args:
          kernels: what computes attention and the adapter terms: "pallas" (the GPU
            kernels; interpreted off GPU), "reference" (plain jnp) or "auto": the
            kernels on a GPU, the references elsewhere.
        """
        use_kernels(kernels)  # a bad name fails here, not at the first trace
        self.config = config
        self.kernels = kernels
        init = dict(param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, **init)
        self.layers = nnx.List(
            [DecoderLayer(config, **init, kernels=kernels) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        # HF stores lm_head.weight as [vocab, d], the embedding layout: no transpose either way.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Embedding(config.vocab_size, config.hidden_size, **init)
        )
        # Static: the device mesh of a model placed by ``loqjax.sharding.shard_model``.
        self.mesh: Mesh | None = None

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
        out = self.hidden(tokens, positions, segment_ids, lora, cache=cache, pages=pages)
        x, new_cache = (out, None) if cache is None else out
        logits = self.logits(x if logit_rows is None else x[logit_rows])
        return logits if cache is None else (logits, new_cache)

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        lora: LoraBatch | None = None,
        *,
        cache: KVCache | None = None,
        pages: PageBatch | None = None,
        num_train_rows: int = 0,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """The last decoder layer's output [T, d] (before the final norm), and with a
        cache the updated cache; arguments as for ``__call__``.

        Args:
          num_train_rows: static n; with a cache, rows [0, n) are training rows: they
            attend among themselves by their own segment ids and positions, as without
            a cache, and write nothing to it. Rows [n, T) are served from the cache.
        """
        if (cache is None) != (pages is None):
            raise ValueError("a KV cache and its pages must be passed together")
        if lora is not None:
            lora = lora.on(self.kernels)
            if lora.tiles is None and self.mesh is None and use_kernels(self.kernels):
                if num_slots := self.lora_slots():
                    lora = lora.with_plan(tokens.shape[0], num_slots)  # once for every layer
        cos, sin = rope_cos_sin(positions, self.config)
        x = parallel.constrain_rows(self.mesh, self.embed_tokens(tokens))
        layer_kvs = (None,) * len(self.layers) if cache is None else cache
        new_cache = []
        for layer, kv in zip(self.layers, layer_kvs, strict=True):
            x, kv = apply_layer(
                layer,
                x,
                cos,
                sin,
                positions,
                segment_ids,
                lora,
                kv,
                pages,
                num_train_rows=num_train_rows,
            )
            new_cache.append(kv)
        return x if cache is None else (x, tuple(new_cache))

    def lora_slots(self) -> int | None:
        """N, the slots of the model's adapter tables (they all have the same), or None
        without tables."""
        layer = self.layers[0]
        for parent, names in PROJECTIONS.items():
            for name in names:
                table = getattr(getattr(layer, parent), name).adapters
                if table is not None:
                    return table.a.shape[0]
        return None

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output head: hidden [R, d] -> float32 logits [R, vocab]."""
        return self._head().attend(self.norm(x))

    def token_losses(self, x: jax.Array, targets: jax.Array) -> jax.Array:
        """``token_cross_entropy(self.logits(x), targets)``: hidden [R, d], int32 targets
        [R] -> float32 [R], without ever holding all R rows' logits
        (``loqjax.loss.head_token_losses``)."""
        return head_token_losses(self.norm(x), self._head().embedding[...], targets)

    def _head(self) -> Embedding:
        return self.embed_tokens if self.lm_head is None else self.lm_head
