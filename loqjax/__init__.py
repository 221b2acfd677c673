"""loqjax: fine-tune and serve many LoRA adapters on one shared base LLM in one jitted step."""

from loqjax.adapter import (
    AdapterError,
    DuplicateAdapterError,
    LoraAdapter,
    PeftFormatError,
    RankError,
    ShapeMismatchError,
    TableFullError,
    TargetModuleError,
    UnknownAdapterError,
)
from loqjax.config import Llama3RopeScaling, ModelConfig
from loqjax.hf_checkpoint import CheckpointError, load_model
from loqjax.lora import (
    BASE_PARAMS,
    TARGET_MODULES,
    LoraBatch,
    LoraParam,
    LoraScale,
    LoraTable,
    add_lora_tables,
    lora_tables,
)
from loqjax.model import CausalLM
from loqjax.peft_format import load_peft_adapter, save_peft_adapter
from loqjax.registry import AdapterInfo, AdapterRegistry

__all__ = [
    "BASE_PARAMS",
    "TARGET_MODULES",
    "AdapterError",
    "AdapterInfo",
    "AdapterRegistry",
    "CausalLM",
    "CheckpointError",
    "DuplicateAdapterError",
    "Llama3RopeScaling",
    "LoraAdapter",
    "LoraBatch",
    "LoraParam",
    "LoraScale",
    "LoraTable",
    "ModelConfig",
    "PeftFormatError",
    "RankError",
    "ShapeMismatchError",
    "TableFullError",
    "TargetModuleError",
    "UnknownAdapterError",
    "add_lora_tables",
    "load_model",
    "load_peft_adapter",
    "lora_tables",
    "save_peft_adapter",
]
