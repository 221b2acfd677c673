"""The output head's logits and their gradients against transformers' head (torch), and
the chunked head and loss against the unchunked one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from loqjax.layers import output_logits
from loqjax.loss import head_token_losses, token_cross_entropy

from jaxpr_walk import equations

ROWS, DIM, VOCAB = 24, 64, 160


def operands(dtype):
    """x [T, d], table [V, d] in ``dtype`` and a float32 logits cotangent [T, V]."""
    rng = np.random.default_rng(0)
    x, table = rng.standard_normal((ROWS, DIM)), rng.standard_normal((VOCAB, DIM)) / 8
    return jnp.asarray(x, dtype), jnp.asarray(table, dtype), rng.standard_normal((ROWS, VOCAB))


def grads(x, table, cotangent):
    def loss(x, table):
        return jnp.sum(output_logits(x, table) * cotangent.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, table)


def torch_grads(x, table, cotangent):
    """transformers' head: ``lm_head(x)`` in the weights' dtype, then ``.float()``."""
    x, table = (torch.tensor(np.asarray(a, np.float32)).to(torch.bfloat16) for a in (x, table))
    x.requires_grad_(), table.requires_grad_()
    logits = torch.nn.functional.linear(x, table).float()
    (logits * torch.tensor(cotangent, dtype=torch.float32)).sum().backward()
    return (g.float().numpy() for g in (x.grad, table.grad))


def test_bf16_gradients_match_transformers():
    x, table, cotangent = operands(jnp.bfloat16)
    dx, dtable = grads(x, table, cotangent)
    assert dx.dtype == dtable.dtype == jnp.bfloat16
    for got, want in zip((dx, dtable), torch_grads(x, table, cotangent), strict=True):
        got = np.asarray(got, np.float32)
        # Both round the cotangent to bf16 and the result once: an ulp of bf16 apart.
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max())


def test_bf16_backward_multiplies_in_bf16():
    """No float32 matmul in the backward (XLA would run it as a TF32 GEMM)."""
    x, table, cotangent = operands(jnp.bfloat16)

    def loss(x, table):
        return jnp.sum(output_logits(x, table) * cotangent.astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, table).jaxpr
    dots = [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "dot_general"]
    assert len(dots) == 3, dots  # the forward, dx and dtable
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn


def test_float32_gradients_are_the_plain_einsums():
    x, table, cotangent = operands(jnp.float32)
    g = jnp.asarray(cotangent, jnp.float32)
    dx, dtable = grads(x, table, cotangent)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(dx, g @ table, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dtable, g.T @ x, rtol=1e-5, atol=1e-5)


# --- the chunked head and loss ---

CHUNK = 5  # ROWS = 24: five chunks of 5 rows, the last padded by one


def losses_and_grads(fn, x, table, targets, mask):
    """The loss rows of ``fn(x, table, targets)`` and the gradients of their masked sum
    (cotangents of 0 and 1, as the unified step's slot sums give)."""

    def objective(x, table):
        losses = fn(x, table, targets)
        return jnp.sum(jnp.where(mask, losses, 0.0)), losses

    (_, losses), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        x, table
    )
    return losses, grads


def unchunked(x, table, targets):
    return token_cross_entropy(output_logits(x, table), targets)


def chunked(x, table, targets):
    return head_token_losses(x, table, targets, chunk_rows=CHUNK)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_losses_and_gradients_are_the_unchunked_ones(dtype):
    x, table, _ = operands(dtype)
    rng = np.random.default_rng(1)
    targets = jnp.asarray(rng.integers(0, VOCAB, ROWS), jnp.int32).at[5].set(VOCAB)  # bad id
    mask = jnp.asarray(rng.random(ROWS) < 0.7).at[5].set(False)
    got_losses, got = losses_and_grads(chunked, x, table, targets, mask)
    want_losses, want = losses_and_grads(unchunked, x, table, targets, mask)
    assert np.isnan(got_losses[5]) and np.isfinite(np.delete(got_losses, 5)).all()
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 2**-7}[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def test_chunked_loss_never_holds_all_rows_logits():
    """No intermediate of the differentiated loss has the logits of more than a chunk of
    rows, and XLA's temporaries shrink accordingly."""
    rows, dim, vocab, chunk = 256, 16, 4096, 32
    x = jnp.zeros((rows, dim), jnp.bfloat16)
    table = jnp.zeros((vocab, dim), jnp.bfloat16)
    targets = jnp.zeros(rows, jnp.int32)

    def grad_of(fn):
        return jax.jit(jax.grad(lambda x: jnp.sum(fn(x, table, targets))))

    def chunked(x, table, targets):
        return head_token_losses(x, table, targets, chunk_rows=chunk)

    jaxpr = jax.make_jaxpr(grad_of(chunked))(x).jaxpr
    largest = max(
        np.prod(v.aval.shape) for eqn in equations(jaxpr) for v in eqn.outvars if v.aval.shape
    )
    assert largest <= chunk * vocab, largest  # [rows, vocab] would be 8x that

    def temp_bytes(fn):
        return grad_of(fn).lower(x).compile().memory_analysis().temp_size_in_bytes

    all_logits = rows * vocab * 4
    assert temp_bytes(unchunked) >= all_logits > 4 * temp_bytes(chunked)
