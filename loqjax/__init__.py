"""loqjax: fine-tune and serve many LoRA adapters on one shared base LLM in one jitted step."""

from loqjax.config import Llama3RopeScaling, ModelConfig
from loqjax.hf_checkpoint import CheckpointError, load_model
from loqjax.model import CausalLM

__all__ = ["CausalLM", "CheckpointError", "Llama3RopeScaling", "ModelConfig", "load_model"]
