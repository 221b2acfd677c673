"""Test helpers: tiny random Hugging Face models and PEFT adapters (PyTorch references),
and packing utilities."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

from loqjax import TARGET_MODULES, CausalLM, LoraAdapter, lora_tables

# A sequence length every jitted forward in the tests uses, so each model compiles once.
CAPACITY = 32

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    attn_implementation="eager",
)

# name -> (config class, model class, config kwargs); together they cover GQA and MQA,
# head_dim != hidden/heads, tied and untied heads, q/k/v bias, llama3 RoPE and a window.
HF_ARCHS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=101, tie_word_embeddings=False)),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=128,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            # A short original context puts the scaled and blended bands at wavelengths
            # that positions < CAPACITY can resolve.
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(vocab_size=96, head_dim=8, sliding_window=5, tie_word_embeddings=False),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=112, tie_word_embeddings=True)),
}


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A random fp32 torch model and the directory it was saved to (``model.safetensors``)."""

    torch_model: torch.nn.Module
    path: Path

    @property
    def vocab_size(self) -> int:
        return self.torch_model.config.vocab_size

    def logits(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """float32 [L, vocab] logits of one sequence (int [L] tokens and positions)."""
        with torch.no_grad():
            out = self.torch_model(
                input_ids=torch.as_tensor(tokens, dtype=torch.long)[None],
                position_ids=torch.as_tensor(positions, dtype=torch.long)[None],
            )
        return out.logits[0].float().numpy()


def make_torch_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random model whose weights are large enough that attention is far from uniform."""
    config_cls, model_cls, kwargs = HF_ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **kwargs})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


# The families the LoRA parity tests cover.
LORA_ARCHS = ("llama2", "mistral", "qwen2")

# name -> (r, lora_alpha, target_modules, use_rslora): ranks, target subsets and both
# scalings differ, so a mixed batch exercises every kind of padding and zero slot.
PEFT_ADAPTERS = {
    "qv": (4, 8, ("q_proj", "v_proj"), False),
    "all_rs": (8, 16, tuple(TARGET_MODULES), True),
    "mlp": (2, 4, ("gate_proj", "down_proj"), False),
    "kou": (5, 10, ("k_proj", "o_proj", "up_proj"), False),
    "attn_rs": (3, 6, ("q_proj", "k_proj", "v_proj", "o_proj"), True),
}


# Adapter tables of the LoRA test models: every PEFT_ADAPTERS entry fits, one slot spare.
LORA_NUM_SLOTS = len(PEFT_ADAPTERS) + 1
LORA_MAX_RANK = max(r for r, *_ in PEFT_ADAPTERS.values())


def make_peft_model(base: torch.nn.Module, name: str, seed: int = 0) -> peft.PeftModel:
    """A copy of base with the PEFT_ADAPTERS[name] LoRA adapter, A and B both random
    (PEFT starts B at zero, which would make the adapter a no-op)."""
    r, alpha, targets, use_rslora = PEFT_ADAPTERS[name]
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora
    )
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".lora_" in param_name:
                param.normal_(0.0, 0.1)
    return model


def random_adapter(
    model: CausalLM,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    use_rslora: bool = False,
    seed: int = 0,
) -> LoraAdapter:
    """A loqjax-native adapter with random A and B for ``model``'s tables' projections."""
    rng = np.random.default_rng(seed)
    weights = {}
    for (layer, name), table in lora_tables(model).items():
        if name in targets:
            a = rng.normal(0.0, 0.1, (table.a.shape[1], rank)).astype(np.float32)
            b = rng.normal(0.0, 0.1, (rank, table.b.shape[2])).astype(np.float32)
            weights[layer, name] = (a, b)
    return LoraAdapter(rank, alpha, weights, use_rslora)


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def pack(
    sequences: list[np.ndarray], starts: list[int], capacity: int = CAPACITY
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenates sequences (sequence k gets segment k, positions from starts[k]) and pads
    to capacity with segment -1. Returns int32 [capacity] tokens, positions, segment_ids."""
    tokens = np.zeros(capacity, np.int32)
    positions = np.zeros(capacity, np.int32)
    segment_ids = np.full(capacity, -1, np.int32)
    offset = 0
    for k, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        n = len(seq)
        tokens[offset : offset + n] = seq
        positions[offset : offset + n] = np.arange(start, start + n)
        segment_ids[offset : offset + n] = k
        offset += n
    return tokens, positions, segment_ids
