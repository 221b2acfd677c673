"""Saves a small adapter checkpoint (step 0), then starts saving a large one (step 1);
``test_checkpointing`` SIGKILLs it while the large one is being written.

    python tests/_kill_during_save.py DIRECTORY

Prints "saved 0" once step 0 is complete, then "returned <true|false>" as soon as
``save`` of step 1 returns (whether step 1 was complete by then), then, unless killed,
"finished".
"""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from loqjax import TARGET_MODULES, CausalLM, LoraAdapter, ModelConfig
from loqjax.ckpt import AdapterCheckpoints

BASE = ModelConfig(
    vocab_size=64,
    hidden_size=1024,
    intermediate_size=1024,
    num_layers=1,
    num_heads=8,
    num_kv_heads=8,
    head_dim=128,
)
SMALL_RANK, LARGE_RANK = 1, 768  # the large adapter is 44 MB of float32


def base_model() -> CausalLM:
    return CausalLM(BASE, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def adapter(model: CausalLM, rank: int) -> LoraAdapter:
    """A random adapter of ``rank`` on every projection of ``model``."""
    rng = np.random.default_rng(rank)
    weights = {}
    for layer_index, layer in enumerate(model.layers):
        for name, parent in TARGET_MODULES.items():
            d_in, d_out = getattr(getattr(layer, parent), name).kernel.shape
            weights[layer_index, name] = (
                rng.standard_normal((d_in, rank), np.float32),
                rng.standard_normal((rank, d_out), np.float32),
            )
    return LoraAdapter(rank, 2.0 * rank, weights)


def main(directory: str) -> None:
    model = base_model()
    ckpts = AdapterCheckpoints(model, "big", directory=directory)
    ckpts.save(adapter(model, SMALL_RANK), step=0)
    ckpts.wait_until_finished()
    print("saved 0", flush=True)
    ckpts.save(adapter(model, LARGE_RANK), step=1)
    print(f"returned {str((ckpts.directory / '1').exists()).lower()}", flush=True)
    ckpts.wait_until_finished()
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
