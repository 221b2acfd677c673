"""loqjax: fine-tune and serve many LoRA adapters on one shared base LLM in one jitted step."""

from loqjax.config import Llama3RopeScaling, ModelConfig
from loqjax.model import CausalLM

__all__ = ["CausalLM", "Llama3RopeScaling", "ModelConfig"]
