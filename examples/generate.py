"""Greedy text generation with a loqjax base model, on the serving ``Engine``.

python examples/generate.py [--model DIR] [--prompt TEXT] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp

from loqjax import Engine, EngineConfig, SamplingParams

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


def main(argv: list[str] | None = None) -> str:
    """Runs the CLI; prints and returns the generated continuation."""
    parser = argparse.ArgumentParser(description="Greedy generation with a loqjax model.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint dir")
    parser.add_argument("--prompt", default="copy: Hello =>")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)

    # 512 positions: what the default model has; enough for any prompt of this example.
    config = EngineConfig(max_seq_len=512)
    engine = Engine.from_pretrained(args.model, config, dtype=jnp.dtype(args.dtype))
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    text = engine.submit(args.prompt, sampling=sampling).result().text
    print(f"{args.prompt}{text}")
    return text


if __name__ == "__main__":
    main()
