"""RoPE frequencies against transformers, and the packed attention mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loqjax import ModelConfig
from loqjax.attention import attention_mask, reference_attention
from loqjax.rope import rope_inv_freq

from hf_reference import HF_ARCHS

LLAMA31_8B = dict(
    hidden_size=4096,
    num_attention_heads=32,
    max_position_embeddings=131072,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)


@pytest.mark.parametrize(
    "kwargs",
    [LLAMA31_8B, HF_ARCHS["llama3"][2] | dict(hidden_size=64, num_attention_heads=4), {}],
    ids=["llama3.1-8b", "tiny-llama3", "default"],
)
def test_inv_freq_matches_transformers(kwargs):
    hf = transformers.LlamaConfig(**kwargs)
    rope_type = hf.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(
        rope_type,
        transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters,
    )
    expected = init(hf)[0].numpy()
    np.testing.assert_allclose(rope_inv_freq(ModelConfig.from_hf(hf)), expected, rtol=1e-6)


def test_tiny_llama3_scaling_moves_resolvable_frequencies():
    """Guards the llama3 parity test: scaling must change angles visibly at positions < 32."""
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, **HF_ARCHS["llama3"][2])
    config = ModelConfig.from_hf(hf)
    unscaled = dataclasses.replace(config, rope_scaling=None)
    assert np.max(np.abs(rope_inv_freq(config) - rope_inv_freq(unscaled))) * 31 > 0.1


def test_attention_mask():
    # Two sequences, the second resuming at position 5, then two padding tokens.
    pos = jnp.array([0, 1, 2, 5, 6, 7, 0, 0])
    seg = jnp.array([0, 0, 0, 1, 1, 1, -1, -1])
    mask = np.asarray(attention_mask(pos, pos, seg, seg, sliding_window=2))
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 0, 0, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)
    full = np.asarray(attention_mask(pos, pos, seg, seg))
    assert full[2, 0] and not full[3, 2]


def test_query_without_visible_keys_stays_finite():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32)
    # The padding query (segment -1) sees no key: no key shares its segment.
    out = reference_attention(
        q,
        kv,
        kv,
        jnp.array([0, 0]),
        jnp.array([0, 1, 2]),
        jnp.array([0, -1]),
        jnp.zeros(3, jnp.int32),
    )
    assert out.shape == (2, 4, 8) and np.isfinite(np.asarray(out)).all()


def test_non_finite_values_stay_in_their_segment():
    """0 * NaN is NaN: a bad value in one segment must poison that segment only."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(6, 4, 8)), jnp.float32) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 4 query heads over 2 kv heads
    pos = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
    clean = reference_attention(q, k, v, pos, pos, seg, seg)
    bad = reference_attention(q, k, v.at[4, 1, 3].set(jnp.nan), pos, pos, seg, seg)
    np.testing.assert_array_equal(bad[:4], clean[:4])  # segment 0, and segment 1 before it
    assert np.isnan(bad[4:, 2:]).all()  # the kv head it sits in, from position 1 on
    np.testing.assert_array_equal(bad[4:, :2], clean[4:, :2])  # the other kv head


def test_non_finite_values_stay_in_their_segment_backward():
    """The same isolation for gradients: cotangents of masked pairs are 0 too."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(6, 2, 8)), jnp.float32) for _ in range(3))
    pos = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)

    def segment0_loss(q, k, v):
        return reference_attention(q, k, v, pos, pos, seg, seg)[:3].sum()

    clean = jax.grad(segment0_loss, argnums=(0, 1, 2))(q, k, v)
    bad = jax.grad(segment0_loss, argnums=(0, 1, 2))(
        q.at[4].set(jnp.nan), k.at[5].set(jnp.inf), v.at[3].set(jnp.nan)
    )
    for got, want in zip(bad, clean, strict=True):
        np.testing.assert_array_equal(got, want)


def test_non_finite_cotangent_stays_in_its_segment_backward():
    """A NaN cotangent on a live query row (a later layer overflowed there) makes NaN
    exactly its own dq row and the dk/dv rows of the keys it sees; the other segment's
    gradients are as with a zero cotangent there (0 * NaN through masked pairs would
    otherwise reach every row of dv)."""
    rng = np.random.default_rng(2)
    q, k, v, g = (jnp.asarray(rng.normal(size=(6, 2, 8)), jnp.float32) for _ in range(4))
    pos = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    seg = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)

    def grads(cotangent):
        _, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, pos, pos, seg, seg), q, k, v)
        return vjp(cotangent)

    bad = grads(g.at[4, 1, 3].set(jnp.nan))
    clean = grads(g.at[4, 1, 3].set(0.0))
    dq, dk, dv = (np.asarray(x) for x in bad)
    assert np.isnan(dq[4, 1]).all() and np.isnan(np.delete(dq.reshape(12, 8), 9, 0)).sum() == 0
    for d in (dk, dv):  # query 4 sees keys 3 and 4 of its kv head 1
        np.testing.assert_array_equal(
            np.isnan(d).any(-1), np.isin(np.arange(6), [3, 4])[:, None] & [False, True]
        )
    for got, want in zip(bad, clean, strict=True):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(got)])
        np.testing.assert_array_equal(got[:3], want[:3])  # segment 0
