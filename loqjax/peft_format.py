"""Hugging Face PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format PEFT's ``save_pretrained`` writes and vLLM serves. Tensors are named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`` and stored
in torch layout: ``lora_A`` [r, d_in], ``lora_B`` [d_out, r], the transposes of
``LoraAdapter``'s A and B. Read and written with numpy; no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from loqjax.adapter import LoraAdapter, PeftFormatError, TargetModuleError
from loqjax.lora import TARGET_MODULES, ModuleKey

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)

# PEFT options that change what the adapter computes; each must be off (None, False, {}, []).
_UNSUPPORTED_OPTIONS = (
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "layer_replication",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "kasa_config",
    "monteclora_config",
)


def tensor_name(key: ModuleKey, matrix: str) -> str:
    """PEFT name of the ``matrix`` ("A" or "B") weight of projection ``key``."""
    layer, name = key
    return (
        f"base_model.model.model.layers.{layer}.{TARGET_MODULES[name]}.{name}.lora_{matrix}.weight"
    )


def load_peft_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Reads a PEFT LoRA adapter directory.

    Whether the adapter fits a given base model (layers, projection sizes, rank) is
    checked when it is loaded into an ``AdapterRegistry``.

    Raises:
      PeftFormatError: missing or unreadable file, malformed config, unsupported option
        (``bias`` other than "none", non-empty ``rank_pattern``/``alpha_pattern``, DoRA,
        ...), missing, unexpected or wrongly shaped tensor; the message names it.
      TargetModuleError: ``target_modules`` names something other than a decoder
        projection (``TARGET_MODULES``).
    """
    path = Path(path)
    rank, alpha, use_rslora, targets = _read_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        extra = (
            " (pickled adapter_model.bin is not supported)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise PeftFormatError(f"{path}: no {WEIGHTS_FILE}{extra}")

    try:
        with safe_open(weights_path, framework="numpy") as f:
            names = set(f.keys())
            keys = [
                (layer, name) for layer in _layers(names, targets, weights_path) for name in targets
            ]
            missing = [
                tensor_name(k, m) for k in keys for m in "AB" if tensor_name(k, m) not in names
            ]
            if missing:
                raise PeftFormatError(f"{weights_path}: missing tensor(s) {', '.join(missing)}")
            weights = {key: _read_pair(f, weights_path, key, rank) for key in keys}
    except SafetensorError as e:
        raise PeftFormatError(f"{weights_path}: not a readable safetensors file ({e})") from e
    return LoraAdapter(rank, alpha, weights, use_rslora)


def save_peft_adapter(
    adapter: LoraAdapter,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes ``adapter`` as a PEFT LoRA adapter directory (created if needed).

    Args:
      adapter: the weights keep their dtype.
      path: output directory; existing adapter files in it are overwritten.
      base_model_name_or_path: recorded in the config for PEFT/vLLM; optional.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": list(adapter.target_modules),
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for key, (a, b) in adapter.weights.items():
        tensors[tensor_name(key, "A")] = np.ascontiguousarray(np.asarray(a).T)
        tensors[tensor_name(key, "B")] = np.ascontiguousarray(np.asarray(b).T)
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _read_config(path: Path) -> tuple[int, float, bool, tuple[str, ...]]:
    """(r, lora_alpha, use_rslora, target_modules) of a supported LoRA config."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise PeftFormatError(f"{path}: no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftFormatError(f"{config_path}: malformed JSON ({e})") from e
    if not isinstance(config, dict):
        raise PeftFormatError(f"{config_path}: not a JSON object")

    def fail(problem: str) -> PeftFormatError:
        return PeftFormatError(f"{config_path}: {problem}")

    if config.get("peft_type", "LORA") != "LORA":
        raise fail(f"peft_type {config['peft_type']!r} is not LORA")
    if config.get("bias", "none") != "none":
        raise fail(f'bias={config["bias"]!r} is not supported; bias="none" is required')
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option) not in (None, False, {}, []):
            raise fail(f"{option}={config[option]!r} is not supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise fail(f"missing {field!r}")
    rank, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise fail(f"r={rank!r} is not a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise fail(f"lora_alpha={alpha!r} is not a finite number")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise fail(f"target_modules={targets!r} must be a non-empty list of projection names")
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown:
        raise TargetModuleError(
            f"{config_path}: target_modules {unknown} are not decoder projections "
            f"({', '.join(TARGET_MODULES)})"
        )
    ordered = tuple(name for name in TARGET_MODULES if name in targets)
    return rank, float(alpha), bool(config.get("use_rslora", False)), ordered


def _layers(names: set[str], targets: tuple[str, ...], weights_path: Path) -> list[int]:
    """The layer indices that tensor ``names`` mention; every name must be a LoRA weight
    of a projection in ``targets``."""
    layers = set()
    for name in sorted(names):
        match = _TENSOR_NAME.fullmatch(name)
        if not match or TARGET_MODULES.get(match[3]) != match[2]:
            raise PeftFormatError(f"{weights_path}: unexpected tensor {name}")
        if match[3] not in targets:
            raise PeftFormatError(
                f"{weights_path}: tensor {name} is for {match[3]}, not in target_modules"
            )
        layers.add(int(match[1]))
    if not layers:
        raise PeftFormatError(f"{weights_path}: no LoRA tensors")
    return sorted(layers)


def _read_pair(f, weights_path: Path, key: ModuleKey, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [d_in, r], B [r, d_out]) of one projection, shapes checked from the header."""
    pair = []
    for matrix, rank_axis in (("A", 0), ("B", 1)):
        name = tensor_name(key, matrix)
        shape = tuple(f.get_slice(name).get_shape())
        if len(shape) != 2 or shape[rank_axis] != rank:
            want = f"[{rank}, d_in]" if matrix == "A" else f"[d_out, {rank}]"
            raise PeftFormatError(
                f"{weights_path}: tensor {name} has shape {shape}, expected {want}"
            )
        pair.append(f.get_tensor(name).T)
    return pair[0], pair[1]
