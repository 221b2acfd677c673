"""The default checkpoint and examples/generate.py."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from loqjax import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location(
        "generate_example", ROOT / "examples" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_tokenizer_is_byte_level():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "checkpoints" / "default")
    text = "Hi ö\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == [tokenizer.bos_token_id] + [3 + b for b in text.encode()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_greedy_generate_matches_argmax(generate, forward):
    config, model = load_model(generate.DEFAULT_MODEL)
    prompt = [1, 75, 108, 108]
    new_ids = generate.greedy_generate(model, prompt, max_new_tokens=5)
    assert len(new_ids) == 5 and all(0 <= i < config.vocab_size for i in new_ids)

    # Each step must be the argmax of one forward over prompt + previous picks.
    seq = np.asarray(prompt + new_ids[:-1], np.int32)
    logits = forward(model, seq, np.arange(len(seq), dtype=np.int32), np.zeros(len(seq), np.int32))
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1 :], axis=-1), new_ids)


def test_main_prints_continuation(generate, capsys):
    text = generate.main(["--prompt", "Hello", "--max-new-tokens", "4"])
    assert isinstance(text, str)
    assert capsys.readouterr().out.startswith("Hello")
