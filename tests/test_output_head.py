"""The output head's logits and their gradients against transformers' head (torch)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from loqjax.layers import output_logits

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
