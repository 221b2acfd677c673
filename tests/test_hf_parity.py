"""Our float32 logits against PyTorch (transformers, eager attention) on tiny random models."""

import numpy as np
import pytest

from hf_reference import CAPACITY, HF_ARCHS, pack, rel_err

TOL = 1e-4


def _random_tokens(vocab_size: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, n, dtype=np.int32)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_logits_match_torch(arch, hf_models, loaded_models, forward):
    hf = hf_models[arch]
    _, model = loaded_models[arch]
    tokens = _random_tokens(hf.vocab_size, CAPACITY, seed=1)
    positions = np.arange(CAPACITY, dtype=np.int32)
    ours = forward(model, tokens, positions, np.zeros(CAPACITY, np.int32))
    err = rel_err(ours, hf.logits(tokens, positions))
    assert err < TOL, f"{arch}: rel err {err:.2e}"


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_packed_batch_matches_per_sequence(arch, hf_models, loaded_models, forward):
    """Three sequences (one starting mid-document, at position 17) plus 4 padding tokens."""
    hf = hf_models[arch]
    _, model = loaded_models[arch]
    seqs = [_random_tokens(hf.vocab_size, n, seed) for seed, n in enumerate((9, 13, 6))]
    starts = [0, 17, 0]
    packed = np.asarray(forward(model, *pack(seqs, starts)))
    assert np.isfinite(packed).all()

    offset = 0
    for k, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        rows = packed[offset : offset + len(seq)]
        alone = np.asarray(forward(model, *pack([seq], [start])))[: len(seq)]
        np.testing.assert_allclose(rows, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
        ref = hf.logits(seq, np.arange(start, start + len(seq)))
        err = rel_err(rows, ref)
        assert err < TOL, f"{arch} sequence {k}: rel err {err:.2e}"
        offset += len(seq)


def test_sliding_window_is_exercised(hf_models):
    """Guards the Mistral parity tests: with these lengths the window changes the logits."""
    hf = hf_models["mistral"]
    tokens = _random_tokens(hf.vocab_size, CAPACITY, seed=1)
    positions = np.arange(CAPACITY)
    windowed = hf.logits(tokens, positions)
    hf.torch_model.config.sliding_window = None
    try:
        full = hf.logits(tokens, positions)
    finally:
        hf.torch_model.config.sliding_window = HF_ARCHS["mistral"][2]["sliding_window"]
    assert rel_err(full, windowed) > 100 * TOL
