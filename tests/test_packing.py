"""Packing invariance: a sequence's logits do not depend on what else shares the batch."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_reference import CAPACITY, HF_ARCHS, pack

ARCH = "mistral"  # sliding window + GQA: the richest mask
VOCAB = HF_ARCHS[ARCH][2]["vocab_size"]


@st.composite
def packings(draw):
    """1-4 sequences of random ids, each resuming at a random position, that fit CAPACITY."""
    lengths = draw(
        st.lists(st.integers(1, 12), min_size=1, max_size=4).filter(lambda ls: sum(ls) <= CAPACITY)
    )
    starts = draw(st.lists(st.integers(0, 200), min_size=len(lengths), max_size=len(lengths)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return [rng.integers(0, VOCAB, n, dtype=np.int32) for n in lengths], starts


@settings(max_examples=15, deadline=None)
@given(packing=packings(), pad_token=st.integers(0, VOCAB - 1), pad_position=st.integers(0, 300))
def test_packed_equals_alone_and_padding_is_inert(
    packing, pad_token, pad_position, loaded_models, forward
):
    seqs, starts = packing
    model = loaded_models[ARCH][1]
    tokens, positions, segment_ids = pack(seqs, starts)
    packed = np.asarray(forward(model, tokens, positions, segment_ids))
    assert np.isfinite(packed).all()

    # Different padding contents must not change a single real logit.
    is_pad = segment_ids < 0
    repadded = np.asarray(
        forward(
            model,
            np.where(is_pad, pad_token, tokens),
            np.where(is_pad, pad_position, positions),
            segment_ids,
        )
    )
    np.testing.assert_array_equal(repadded[~is_pad], packed[~is_pad])

    offset = 0
    for seq, start in zip(seqs, starts, strict=True):
        alone = np.asarray(forward(model, *pack([seq], [start])))[: len(seq)]
        rows = packed[offset : offset + len(seq)]
        np.testing.assert_allclose(rows, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
        offset += len(seq)
