"""Parameter-holding building blocks: Linear (and ``project``, several sharing an input),
RMSNorm, Embedding."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from loqjax import parallel
from pallas_kernels import smlm_group, smlm_group_reference
from pallas_kernels.platform import use_kernels

if TYPE_CHECKING:
    from loqjax.lora import LoraBatch, LoraTable


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``, kernel [d_in, d_out] (HF's weight transposed).

    The single matmul site of the seven decoder projections (q/k/v/o, gate/up/down), so
    per-token adapters are added here: ``loqjax.lora.add_lora_tables`` sets ``adapters`` to
    a ``LoraTable`` on the targeted projections, and ``loqjax.sharding.shard_model`` sets
    ``tensor_parallel`` (static) to how the projection is split over a device mesh.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.adapters: LoraTable | None = nnx.data(None)
        self.tensor_parallel: parallel.TensorParallel | None = None

    def __call__(self, x: jax.Array, lora: LoraBatch | None = None) -> jax.Array:
        """x [..., d_in] -> [..., d_out], in the parameter dtype.

        With a table and ``lora`` metadata, x must be [T, d_in] and each row also gets
        its adapter slot's term; otherwise this is the base projection alone. With
        ``lora.train_rows`` set, only that many leading rows get an input gradient.
        """
        return project([self], x, lora)[0]

    def base(self, x: jax.Array, lora: LoraBatch | None = None) -> jax.Array:
        """The base projection alone (bias included), as ``__call__`` differentiates it."""
        if lora is not None and lora.train_rows is not None:
            y = _leading_rows_matmul(x, self.kernel[...], lora.train_rows)
        else:
            y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def project(linears: Sequence[Linear], x: jax.Array, lora: LoraBatch | None) -> list[jax.Array]:
    """``[linear(x, lora) for linear in linears]`` for projections of one input (q, k and
    v; gate and up), their adapter terms in one grouped SMLM: at decode sizes one kernel
    launch for the whole group instead of two per projection.

    Like PEFT, an adapter computes in its own dtype whatever the input's. The terms are
    the kernels' or the plain-jnp reference's, as ``lora.kernels`` says. On a mesh (the
    linears' ``tensor_parallel``, the same for all of them), the base outputs take their
    Megatron layout and the adapter terms run on each device's shard
    (``loqjax.parallel.lora_projection``).
    """
    tp = linears[0].tensor_parallel
    ys = [parallel.constrain_projection(tp, linear.base(x, lora)) for linear in linears]
    grouped = [i for i, linear in enumerate(linears) if linear.adapters is not None]
    if lora is None or not grouped:
        return ys
    tables = [linears[i].adapters.arrays() for i in grouped]
    args = (x.astype(tables[0][0].dtype), tables, [ys[i] for i in grouped])
    args += (lora.seg_ends, lora.seg_slots, lora.grad_rows)
    if not use_kernels(lora.kernels):  # plain jnp; on a mesh, GSPMD partitions it
        outs = smlm_group_reference(*args)
    elif tp is None:
        outs = smlm_group(*args, lora.tiles)
    else:  # each device plans its own shard's rows
        outs = parallel.lora_projection(tp, *args)
    for i, y in zip(grouped, outs, strict=True):
        ys[i] = y
    return ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _leading_rows_matmul(x: jax.Array, kernel: jax.Array, num_rows: int) -> jax.Array:
    """``x @ kernel`` (x [T, d_in]) whose backward gives x a gradient in its first
    ``num_rows`` rows only (zero below) and the frozen kernel none: the serving rows of a
    unified batch cost no backward matmul."""
    return x @ kernel


def _leading_rows_matmul_fwd(x, kernel, num_rows):
    # A zero-size array carries x's dtype to the backward.
    return x @ kernel, (kernel, jnp.zeros((0,), x.dtype))


def _leading_rows_matmul_bwd(num_rows, residuals, g):
    kernel, x_like = residuals
    dx = (g[:num_rows] @ kernel.T).astype(x_like.dtype)
    rest = jnp.zeros((g.shape[0] - num_rows, kernel.shape[0]), x_like.dtype)
    return jnp.concatenate([dx, rest]), None


_leading_rows_matmul.defvjp(_leading_rows_matmul_fwd, _leading_rows_matmul_bwd)


class RMSNorm(nnx.Module):
    """HF Llama RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim] in the promoted dtype of x and scale."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class Embedding(nnx.Module):
    """Token table [vocab, dim], used for input lookup and (tied or not) as the output head."""

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        # Unit-variance logits when the table doubles as the output head.
        init = nnx.initializers.normal(stddev=dim**-0.5)
        self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, dim), param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int32 [T] -> [T, dim]. Ids must lie in [0, vocab)."""
        return self.embedding[...][tokens]

    def attend(self, x: jax.Array) -> jax.Array:
        """x [T, dim] -> float32 logits [T, vocab], accumulated in float32."""
        return output_logits(x, self.embedding[...])


@jax.custom_vjp
def output_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """``x @ table.T``: x [T, d], table [V, d] of one dtype -> float32 logits [T, V].

    The backward rounds the float32 logits' cotangent to the operands' dtype before its
    matmuls, as transformers' head does (its bf16 logits take a bf16 cotangent).
    Otherwise XLA promotes a bf16 table to float32 for the input gradient: a TF32 GEMM
    of 5.5 ms a step, twice the forward's, in the Llama-3-8B fine-tuning step (RESULTS.md,
    run 20), and a float32 copy of the table (that step's peak 29.50 -> 28.25 GiB without
    it, run 30). Exact for float32 operands.
    """
    return jnp.einsum("td,vd->tv", x, table, preferred_element_type=jnp.float32)


def _output_logits_fwd(x, table):
    return output_logits(x, table), (x, table)


def _output_logits_bwd(residuals, g):
    x, table = residuals
    g = g.astype(x.dtype)
    dx = jnp.einsum("tv,vd->td", g, table, preferred_element_type=jnp.float32)
    dtable = jnp.einsum("tv,td->vd", g, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dtable.astype(table.dtype)


output_logits.defvjp(_output_logits_fwd, _output_logits_bwd)
