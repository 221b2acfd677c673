"""One transfer for a batch's host arrays: the same arrays as ``jax.device_put``, bit for
bit, with the tree's static metadata."""

import dataclasses

import jax
import numpy as np
import pytest

from loqjax.sampling import SamplingBatch, SamplingParams, SamplingStages
from loqjax.transfer import put


def test_put_equals_device_put_bit_for_bit():
    rng = np.random.default_rng(0)
    floats = rng.normal(size=(3, 5)).astype(np.float32)
    floats[0, :3] = [np.nan, -0.0, np.inf]
    tree = {
        "ints": rng.integers(-(2**31), 2**31, 7, dtype=np.int32),
        "words": np.array([0, 2**32 - 1, 12345], np.uint32),
        "floats": floats,
        "mask": rng.random((2, 4)) < 0.5,
        "empty": np.zeros((0, 3), np.int32),
        "nothing": None,
    }
    ours, theirs = put(tree), jax.device_put(tree)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8)
        )


def test_static_metadata_survives():
    params = [SamplingParams(temperature=0.5, top_p=0.9)]
    host = SamplingBatch.pack_host(params, [1], [0], [[]], 2, 4, vocab_size=10)
    batch = put(host)
    assert batch.stages == SamplingStages(truncate=True, draw=True)
    for field in dataclasses.fields(host):
        if field.name != "stages":
            np.testing.assert_array_equal(getattr(batch, field.name), getattr(host, field.name))


def test_other_dtypes_are_refused():
    with pytest.raises(TypeError, match="4-byte dtypes or bool, got int64"):
        put([np.zeros(2, np.int64)])
