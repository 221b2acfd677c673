"""Greedy text generation with a loqjax base model.

    python examples/generate.py [--model DIR] [--prompt TEXT] [--max-new-tokens N]

No KV cache yet: every step recomputes the whole prefix over one fixed-capacity packed
buffer (sequence = segment 0, the unused tail = padding, segment -1), so the step
compiles exactly once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import AutoTokenizer

from loqjax import CausalLM, load_model

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
CAPACITY_MULTIPLE = 64  # buffer lengths are rounded up so nearby prompt sizes share a compile


@nnx.jit
def greedy_step(
    model: CausalLM, tokens: jax.Array, segment_ids: jax.Array, length: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Appends the argmax next token of the sequence occupying tokens[:length].

    Args:
      tokens, segment_ids: int32 [C] buffer; segment 0 on [0, length), -1 after.
      length: int32 scalar, 0 < length < C.

    Returns:
      (tokens, segment_ids) with slot ``length`` filled.
    """
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    logits = model(tokens, positions, segment_ids)
    next_id = jnp.argmax(logits[length - 1]).astype(jnp.int32)
    return tokens.at[length].set(next_id), segment_ids.at[length].set(0)


def greedy_generate(
    model: CausalLM, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
    """Greedy continuation of prompt_ids: up to max_new_tokens ids, stopping after eos_id."""
    n = len(prompt_ids)
    capacity = -(-(n + max_new_tokens) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
    tokens = jnp.zeros(capacity, jnp.int32).at[:n].set(jnp.asarray(prompt_ids, jnp.int32))
    segment_ids = jnp.full(capacity, -1, jnp.int32).at[:n].set(0)
    new_ids = []
    for length in range(n, n + max_new_tokens):
        tokens, segment_ids = greedy_step(model, tokens, segment_ids, jnp.int32(length))
        new_ids.append(int(tokens[length]))
        if new_ids[-1] == eos_id:
            break
    return new_ids


def main(argv: list[str] | None = None) -> str:
    """Runs the CLI; prints and returns the generated continuation."""
    parser = argparse.ArgumentParser(description="Greedy generation with a loqjax model.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint dir")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)

    _, model = load_model(args.model, dtype=jnp.dtype(args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompt_ids = tokenizer(args.prompt)["input_ids"]
    new_ids = greedy_generate(model, prompt_ids, args.max_new_tokens, tokenizer.eos_token_id)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    print(f"{args.prompt}{text}")
    return text


if __name__ == "__main__":
    main()
