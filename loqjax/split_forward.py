"""Forward over training and serving rows together, backward over training rows only.

A unified batch packs ``n`` training rows first and serving rows after. Both go through
each base GEMM together (one matmul per projection per layer), but only training rows are
differentiated. Autodiff cannot prune the serving rows by itself: ``concat(x_train,
stop_gradient(x_serve)) @ w`` still transposes to a matmul over all rows, and the norms,
activations and attention of the concatenated rows save residuals for every row.

``split_rows`` therefore defines the derivative of each decoder layer itself, with
``jax.custom_vjp``: the forward runs the layer once on the concatenated rows and saves only
its training-row input; the backward re-runs the layer on the training rows alone and
takes that VJP. This is exact because no training row reads a serving row (attention
never mixes segments) and serving outputs carry no gradient, and it leaves serving rows
with no saved activation and no backward op at all. The price is a recomputation of each
layer's forward for the training rows (what the backward reads of it; XLA drops the
rest): per-layer activation checkpointing, which also bounds the saved training
activations to one [n, d] input per layer. The final norm and head run on the two parts
apart: the serving rows' few logits without gradient, the training rows' losses a chunk
of rows at a time (``CausalLM.token_losses``).

``split_losses(..., saved_layers=k)`` runs the last k layers as the "save" strategy does
instead: autodiff keeps their activations (only the training rows get a backward:
``LoraBatch.train_rows``) and nothing of them is recomputed. That trades memory for time a
layer at a time: a saved layer holds its training rows' activations and spares its
forward's recomputation.

``tests/test_unified_step.py`` checks the pruning on the traced step: differentiating it
adds no matmul over serving rows to the forward's and saves no serving-row residual,
where stopping the serving rows' gradient alone adds both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from loqjax.kv_cache import KVCache, PageBatch
from loqjax.lora import LoraBatch, LoraParam
from loqjax.model import CausalLM, apply_layer
from loqjax.rope import rope_cos_sin


def split_rows(
    fn: Callable,
    params,
    x_train: jax.Array,
    x_serve: jax.Array,
    rows=(),
    consts=(),
    state=None,
):
    """``fn`` over the rows of ``x_train`` and ``x_serve`` in one call, differentiated
    through the training rows only.

    Args:
      fn: ``fn(params, x, rows, consts, state, num_train_rows) -> (y, new_state)``
        mapping [R, ...] rows to [R, ...] rows, where no output row depends on an input
        row of the other part. In the backward it is called on the training rows alone
        with ``state=None`` (and ``num_train_rows`` = all of them).
      params: pytree, differentiated.
      x_train: [n, ...], differentiated.
      x_serve: [m, ...], not differentiated.
      rows: pytree of [n + m, ...] per-row arrays (positions, ...), not differentiated;
        the backward gives ``fn`` their first n rows.
      consts: pytree, not differentiated (frozen weights; metadata valid for any prefix of
        the rows).
      state: pytree threaded through the forward only (a layer's KV cache), or None.

    Returns:
      (y_train [n, ...], y_serve [m, ...], new_state); y_serve and new_state carry no
      gradient.
    """
    stop = jax.lax.stop_gradient
    (y_train, y_serve), new_state = _split_rows(
        fn, params, x_train, stop(x_serve), stop(rows), stop(consts), stop(state)
    )
    return y_train, stop(y_serve), stop(new_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _split_rows(fn, params, x_train, x_serve, rows, consts, state):
    n = x_train.shape[0]
    y, new_state = fn(params, jnp.concatenate([x_train, x_serve]), rows, consts, state, n)
    return (y[:n], y[n:]), new_state


def _split_rows_fwd(fn, params, x_train, x_serve, rows, consts, state):
    train_rows = jax.tree.map(lambda r: r[: x_train.shape[0]], rows)
    return _split_rows(fn, params, x_train, x_serve, rows, consts, state), (
        params,
        x_train,
        train_rows,
        consts,
    )


def _split_rows_bwd(fn, residuals, cotangents):
    params, x_train, train_rows, consts = residuals
    n = x_train.shape[0]
    # Tied to the cotangent, the recomputation cannot be scheduled before the layers
    # above have been differentiated, which would hold every layer's activations at once.
    x_train, d_y = jax.lax.optimization_barrier((x_train, cotangents[0][0]))
    _, vjp = jax.vjp(lambda p, x: fn(p, x, train_rows, consts, None, n)[0], params, x_train)
    d_params, d_x = vjp(d_y)
    return d_params, d_x, None, None, None, None


_split_rows.defvjp(_split_rows_fwd, _split_rows_bwd)


def _decoder_layer(graphdef, params, x, rows, consts, kv, num_train_rows):
    frozen, lora, pages = consts
    layer = nnx.merge(graphdef, params, frozen)
    # Without the cache (the backward), every row is a training row.
    pages = None if kv is None else pages
    return apply_layer(layer, x, *rows, lora, kv, pages, num_train_rows=num_train_rows)


def _saved_layer(layer, x_train, x_serve, rows, lora, kv, pages):
    """One decoder layer over both parts, its activations kept by autodiff: ``split_rows``'
    results, with no recomputation and ``lora.train_rows`` = n."""
    n = x_train.shape[0]
    x = jnp.concatenate([x_train, x_serve])
    y, kv = apply_layer(layer, x, *rows, lora, kv, pages, num_train_rows=n)
    return y[:n], jax.lax.stop_gradient(y[n:]), jax.lax.stop_gradient(kv)


def split_losses(
    model: CausalLM,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    lora: LoraBatch,
    targets: jax.Array,
    *,
    num_train_rows: int,
    serve_rows: jax.Array | None = None,
    cache: KVCache | None = None,
    pages: PageBatch | None = None,
    saved_layers: int = 0,
) -> tuple[jax.Array, jax.Array, KVCache | None]:
    """The training rows' token losses and the chosen serving rows' logits of a unified
    batch.

    The same values as ``token_cross_entropy(logits[:n], targets)`` and ``logits`` at the
    serving rows, ``logits`` being ``model(tokens, positions, segment_ids, lora)`` (with a
    cache, as ``model.hidden(..., cache=cache, pages=pages, num_train_rows=n)``); the
    model's ``LoraParam`` values are differentiated through the training rows only. The
    training rows' logits are never all held at once (``CausalLM.token_losses``).

    Args:
      model: a ``CausalLM`` with adapter tables.
      tokens, positions, segment_ids: int32 [T], packed as for ``CausalLM.__call__``; no
        segment spans row ``num_train_rows``.
      lora: each row's adapter slot; ``grad_rows`` at most ``num_train_rows``.
      targets: int32 [n], each training row's next token.
      num_train_rows: static n: rows [0, n) train, rows [n, T) serve.
      serve_rows: int32 [M], serving rows (in [n, T)) whose logits to compute; None for
        all of them.
      cache, pages: the serving rows' KV cache and its addressing, or None.
      saved_layers: static k in [0, layers]: the last k layers keep their activations
        instead of recomputing them in the backward (see the module docstring).

    Returns:
      (float32 [n] training token losses, float32 [M, V] (or [T - n, V]) serving logits
      without gradient, the updated cache or None).
    """
    n = num_train_rows
    num_layers = len(model.layers)
    if not 0 <= saved_layers <= num_layers:
        raise ValueError(f"saved_layers must be in [0, {num_layers}], got {saved_layers}")
    cos, sin = rope_cos_sin(positions, model.config)
    x = model.embed_tokens(tokens)
    x_train, x_serve = x[:n], x[n:]
    rows = (cos, sin, positions, segment_ids)
    saved_lora = dataclasses.replace(lora, train_rows=n)
    layer_kvs = (None,) * num_layers if cache is None else cache
    new_cache = []
    for i, (layer, kv) in enumerate(zip(model.layers, layer_kvs, strict=True)):
        if i >= num_layers - saved_layers:
            x_train, x_serve, kv = _saved_layer(
                layer, x_train, x_serve, rows, saved_lora, kv, pages
            )
        else:
            graphdef, params, frozen = nnx.split(layer, LoraParam, ...)
            x_train, x_serve, kv = split_rows(
                functools.partial(_decoder_layer, graphdef),
                params,
                x_train,
                x_serve,
                rows,
                (frozen, lora, pages),
                kv,
            )
        new_cache.append(kv)
    if serve_rows is not None:
        x_serve = x_serve[serve_rows - n]
    # The head runs on the two parts apart: the serving rows are few, and the training
    # rows' losses come a chunk of rows at a time.
    serve_logits = jax.lax.stop_gradient(model.logits(x_serve))
    train_losses = model.token_losses(x_train, targets)
    return train_losses, serve_logits, None if cache is None else tuple(new_cache)
