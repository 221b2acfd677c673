"""Bad serving requests raise a ``RequestError`` at submit and leave the engine serving
correctly: out-of-vocabulary, empty, too long or non-Unicode prompts, unknown adapters,
invalid sampling parameters (hypothesis-generated and explicit)."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loqjax import (
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    SamplingParams,
    UnknownAdapterError,
)

from _reliability import ADAPTER, CONFIG, REFERENCE, TRIED

VOCAB = 259  # the default model's
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

in_vocab = st.integers(0, VOCAB - 1)
out_of_vocab = st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB))


@st.composite
def bad_token_ids(draw):
    """A short id list (fits the context) with at least one id outside the vocabulary."""
    ids = draw(st.lists(in_vocab, max_size=CONFIG.max_seq_len - 2))
    for _ in range(draw(st.integers(1, 3))):
        ids.insert(draw(st.integers(0, len(ids))), draw(out_of_vocab))
    return ids


@SETTINGS
@given(ids=bad_token_ids(), adapter=st.sampled_from([None, ADAPTER]))
def test_out_of_vocab_ids(engine, still_serves, ids, adapter):
    TRIED["token ids out of vocab"] += 1
    with pytest.raises(InvalidPromptError, match=r"outside the vocabulary \[0, 259\)"):
        engine.submit(ids, adapter)
    still_serves()


# field -> invalid values; every other field is drawn valid.
INVALID = {
    "temperature": st.one_of(
        st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf, "0.5", None, True])
    ),
    "top_k": st.one_of(st.integers(max_value=-1), st.sampled_from([1.5, "4", None])),
    "top_p": st.one_of(
        st.floats(max_value=0.0),
        st.floats(min_value=1.0, exclude_min=True),
        st.sampled_from([math.nan, "1", None]),
    ),
    "repetition_penalty": st.one_of(st.floats(max_value=0.0), st.sampled_from([math.inf, "2"])),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), st.just(1.0)),
    "max_tokens": st.one_of(st.integers(max_value=0), st.sampled_from([2.0, None])),
    "stop_token_ids": st.one_of(
        st.lists(st.integers(max_value=-1), min_size=1), st.sampled_from([[1.0], ["2"], 5])
    ),
    "stop": st.sampled_from(["", [""], [3], 7]),
    "ignore_eos": st.sampled_from([0, 1, "yes", None]),
}
VALID = {
    "temperature": st.floats(0.0, 2.0),
    "top_k": st.integers(0, 50),
    "top_p": st.floats(0.01, 1.0),
    "repetition_penalty": st.floats(0.5, 2.0),
    "seed": st.none() | st.integers(0, 2**32 - 1),
    "max_tokens": st.integers(1, 64),
    "stop_token_ids": st.lists(in_vocab, max_size=3),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "ignore_eos": st.booleans(),
}


@st.composite
def bad_sampling_kwargs(draw):
    """A SamplingParams kwargs dict: a random subset of valid fields, and 1-3 invalid."""
    bad = draw(st.lists(st.sampled_from(sorted(INVALID)), min_size=1, max_size=3, unique=True))
    kwargs = {f: draw(VALID[f]) for f in VALID if f not in bad and draw(st.booleans())}
    return kwargs | {f: draw(INVALID[f]) for f in bad}, bad


@settings(SETTINGS, max_examples=150)
@given(case=bad_sampling_kwargs())
def test_invalid_sampling_params(case):
    TRIED["invalid sampling params"] += 1
    kwargs, bad = case
    with pytest.raises(InvalidSamplingParamsError, match=rf"^({'|'.join(bad)}) must be"):
        SamplingParams(**kwargs)


# case -> (prompt, adapter, sampling, error, match)
EXPLICIT = {
    "unknown adapter": ([5], "nope", None, UnknownAdapterError, "no adapter named 'nope'"),
    "empty text": ("", None, None, InvalidPromptError, "the prompt is empty"),
    "empty ids": ([], ADAPTER, None, InvalidPromptError, "the prompt is empty"),
    "empty array": (np.zeros(0, int), None, None, InvalidPromptError, "the prompt is empty"),
    "ids at max_seq_len": (
        [5] * CONFIG.max_seq_len,
        ADAPTER,
        None,
        PromptTooLongError,
        "has 64 tokens; max_seq_len=64",
    ),
    "long text": ("x" * 500, None, None, PromptTooLongError, "max_seq_len=64"),
    "lone surrogate": ("a\ud800b", None, None, InvalidPromptError, "not valid Unicode"),
    "id = vocab": ([1, VOCAB], None, None, InvalidPromptError, r"\[259\] are outside"),
    "stop id = vocab": (
        [5],
        None,
        SamplingParams(stop_token_ids=[VOCAB]),
        InvalidSamplingParamsError,
        r"stop_token_ids \[259\] are outside",
    ),
    "sampling dict": ([5], None, {"temperature": -1}, InvalidSamplingParamsError, "SamplingParams"),
}


def test_explicit_bad_requests_then_serves(engine, still_serves):
    for prompt, adapter, sampling, error, match in EXPLICIT.values():
        TRIED["explicit bad requests"] += 1
        with pytest.raises(error, match=match):
            engine.submit(prompt, adapter, sampling)
    still_serves()


def test_serves_after_bad_requests_mixed_with_good(engine, still_serves, reference_output):
    """Bad submits interleaved with running requests affect none of them."""
    handles = []
    for prompt, adapter, sampling, error, _ in EXPLICIT.values():
        handles.append(engine.submit(*REFERENCE))
        engine.step()
        with pytest.raises(error):
            engine.submit(prompt, adapter, sampling)
    for handle in handles:
        assert handle.result().token_ids == reference_output.token_ids
    still_serves()
