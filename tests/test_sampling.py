"""The sampler: logits processing as in transformers, frequencies, per-request keys, and
parameter checks."""

import itertools

import jax
import numpy as np
import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loqjax.request import InvalidSamplingParamsError
from loqjax.sampling import SamplingBatch, SamplingParams, SamplingStages, sample, warp_logits

from jaxpr_walk import host_synced

VOCAB = 50

sample_jit = jax.jit(sample)


def _batch(params, seeds=None, steps=None, seen=None, num_rows=None):
    n = len(params)
    return SamplingBatch.pack(
        params,
        seeds if seeds is not None else [0] * n,
        steps if steps is not None else [0] * n,
        seen if seen is not None else [[]] * n,
        num_rows=num_rows or n,
        seen_capacity=16,
        vocab_size=VOCAB,
    )


# (temperature, top_k, top_p, repetition_penalty) per row.
ROWS = [
    (1.0, 0, 1.0, 1.0),
    (0.7, 5, 1.0, 1.0),
    (1.3, 0, 0.8, 1.0),
    (0.5, 10, 0.6, 1.3),
    (1.0, 0, 1.0, 0.7),
    (2.0, 3, 0.3, 1.5),
]


def test_warping_matches_transformers():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (len(ROWS), VOCAB)).astype(np.float32)
    seen = [rng.integers(0, VOCAB, rng.integers(1, 16)).tolist() for _ in ROWS]
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r) for t, k, p, r in ROWS
    ]
    ours = np.asarray(warp_logits(logits, _batch(params, seen=seen)))
    for row, (t, k, p, r) in enumerate(ROWS):
        processors = [RepetitionPenaltyLogitsProcessor(r), TemperatureLogitsWarper(t)]
        processors += [TopKLogitsWarper(k)] if k else []
        processors += [TopPLogitsWarper(p)]
        scores = torch.as_tensor(logits[row : row + 1])
        for processor in processors:
            scores = processor(torch.as_tensor([seen[row]]), scores)
        np.testing.assert_allclose(ours[row], scores[0].numpy(), rtol=1e-6)
        assert np.isfinite(ours[row]).sum() < VOCAB or (k, p) == (0, 1.0)


def test_greedy_rows_take_the_penalized_argmax():
    logits = np.array([[1.0, 3.0, 2.9, -1.0]] * 2, np.float32)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
    ]
    batch = SamplingBatch.pack(params, [0, 0], [0, 0], [[1], [1]], 2, 4, vocab_size=4)
    np.testing.assert_array_equal(sample_jit(logits, batch), [1, 2])


def test_frequencies_follow_the_warped_distribution():
    """Rows with different seeds are independent draws; top-k and top-p cut the tail."""
    n = 4000
    logits = np.tile(np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32)), (n, 1))
    for params, expected in [
        (SamplingParams(), [0.4, 0.3, 0.15, 0.1, 0.05]),
        (SamplingParams(top_k=2), [4 / 7, 3 / 7, 0, 0, 0]),
        (SamplingParams(top_p=0.8), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
        (SamplingParams(temperature=0.5), np.array([16, 9, 2.25, 1, 0.25]) / 28.5),
    ]:
        batch = SamplingBatch.pack([params] * n, range(n), [3] * n, [[]] * n, n, 1, vocab_size=5)
        freq = np.bincount(np.asarray(sample_jit(logits, batch)), minlength=5) / n
        np.testing.assert_allclose(freq, expected, atol=0.03)
        assert np.all(freq[np.asarray(expected) == 0] == 0)


def test_a_draw_depends_on_seed_and_step_only():
    rng = np.random.default_rng(1)
    logits = np.tile(rng.normal(0, 1, VOCAB).astype(np.float32), (8, 1))
    seeds, steps = [5, 5, 5, 6, 7, 5, 9, 5], [0, 1, 2, 0, 0, 0, 0, 1]
    params = [SamplingParams(temperature=1.5)] * 8
    tokens = np.asarray(sample_jit(logits, _batch(params, seeds, steps)))
    assert tokens[0] == tokens[5] and tokens[1] == tokens[7]
    assert len(set(tokens)) > 3
    # The same rows in another order, among filler rows.
    order = [7, 3, 0, 6, 1, 5, 2, 4]
    shuffled = _batch(
        [params[i] for i in order], [seeds[i] for i in order], [steps[i] for i in order], None, 12
    )
    np.testing.assert_array_equal(
        np.asarray(sample_jit(np.tile(logits[:1], (12, 1)), shuffled))[:8], tokens[order]
    )


# --- the sampler's static stages -----------------------------------------------------

PENALTY = SamplingParams(temperature=0.0, repetition_penalty=1.3)
NUCLEUS = SamplingParams(temperature=0.8, top_p=0.9)


def test_stages_follow_the_parameters():
    assert SamplingStages.of([]) == SamplingStages.of([SamplingParams(temperature=0.0)])
    assert SamplingStages.of([]) == SamplingStages()
    assert SamplingStages.of([PENALTY]) == SamplingStages(penalize=True)
    assert SamplingStages.of([NUCLEUS]) == SamplingStages(truncate=True, draw=True)
    assert SamplingStages.of([SamplingParams(temperature=0.0, top_k=3)]).truncate
    assert SamplingStages.combinations([PENALTY, NUCLEUS, NUCLEUS]) == {
        SamplingStages(),
        SamplingStages(penalize=True),
        SamplingStages(truncate=True, draw=True),
        SamplingStages(penalize=True, truncate=True, draw=True),
    }
    # Filler rows are greedy: a batch has the stages of its requests.
    assert _batch([PENALTY], num_rows=4).stages == SamplingStages(penalize=True)


@pytest.mark.parametrize("stages", list(itertools.product([False, True], repeat=3)))
def test_no_stage_waits_on_the_host(stages):
    """The stages are Python branches, not device conditionals (``jaxpr_walk``)."""
    batch = _batch([PENALTY, NUCLEUS]).with_stages(SamplingStages(*stages))
    logits = np.zeros((2, VOCAB), np.float32)
    assert host_synced(jax.make_jaxpr(sample_jit)(logits, batch).jaxpr) == []


def test_extra_stages_sample_the_same():
    """A stage that no row needs is an identity on its rows (a warm-up runs batches with
    more stages than their rows need)."""
    logits = np.random.default_rng(2).normal(0, 2, (4, VOCAB)).astype(np.float32)
    seen = [[1, 2], [3], [], []]
    every = SamplingStages(penalize=True, truncate=True, draw=True)
    for params in ([PENALTY, PENALTY], [NUCLEUS, NUCLEUS]):
        batch = _batch(params, seeds=[3, 4], seen=seen[:2], num_rows=4)
        np.testing.assert_array_equal(
            sample_jit(logits, batch.with_stages(every)), sample_jit(logits, batch)
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature must be a finite number >= 0, got -0.1"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=2.0), "top_k"),
        (dict(top_p=0.0), r"top_p must be a finite number in \(0, 1\]"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(seed=-1), r"seed must be None or an integer in \[0, 2\*\*32\)"),
        (dict(seed=2**32), "seed"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(stop_token_ids=[1, -2]), "stop_token_ids must be ids >= 0"),
        (dict(stop_token_ids=7), "stop_token_ids must be a sequence"),
        (dict(stop=["ok", ""]), "stop must be non-empty strings"),
        (dict(stop=[3]), "stop must be non-empty strings"),
        (dict(ignore_eos=1), "ignore_eos must be a bool"),
    ],
)
def test_invalid_params_are_rejected(kwargs, match):
    with pytest.raises(InvalidSamplingParamsError, match=match):
        SamplingParams(**kwargs)


def test_params_are_normalised_to_tuples():
    params = SamplingParams(stop="###", stop_token_ids=np.array([3, 4]))
    assert params.stop == ("###",) and params.stop_token_ids == (3, 4)
    hash(params)
