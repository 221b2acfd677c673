"""The default checkpoint and examples/generate.py."""

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_default_tokenizer_is_byte_level():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "checkpoints" / "default")
    text = "Hi ö\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == [tokenizer.bos_token_id] + [3 + b for b in text.encode()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_main_prints_continuation(capsys):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "examples" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    text = generate.main(["--prompt", "copy: Hello =>", "--max-new-tokens", "8"])
    # The pretrained default model copies.
    assert text.startswith(" Hello\n")
    assert capsys.readouterr().out.startswith("copy: Hello =>")
