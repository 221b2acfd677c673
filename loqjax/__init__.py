"""loqjax: fine-tune and serve many LoRA adapters on one shared base LLM in one jitted step."""

from loqjax.adapter import (
    AdapterError,
    DuplicateAdapterError,
    InvalidAdapterError,
    LoraAdapter,
    PeftFormatError,
    RankError,
    ShapeMismatchError,
    TableFullError,
    TargetModuleError,
    UnknownAdapterError,
)
from loqjax.config import Llama3RopeScaling, ModelConfig
from loqjax.engine import Engine, EngineStats, RequestHandle
from loqjax.hf_checkpoint import CheckpointError, load_model
from loqjax.jobs import DatasetError, DuplicateJobError, FineTuneJob, LoraConfig
from loqjax.kv_cache import KVCache, LayerKV, PageBatch, PagePool, init_kv_cache
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
from loqjax.metrics import Metrics
from loqjax.model import CausalLM
from loqjax.optim import SlotOptimizer, SlotOptState, SlotUpdate
from loqjax.peft_format import load_peft_adapter, save_peft_adapter
from loqjax.registry import AdapterInfo, AdapterRegistry
from loqjax.request import (
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestError,
    RequestOutput,
    StreamEvent,
)
from loqjax.runtime import JobRun, Runtime, RuntimeConfig
from loqjax.sampling import SamplingParams
from loqjax.scheduler import EngineConfig
from loqjax.sharding import make_mesh, shard_model
from loqjax.slo_scheduler import SloTargets, StepPolicy
from loqjax.unified import (
    ServeSequence,
    StepOutput,
    TrainSequence,
    TrainState,
    UnifiedBatch,
    make_unified_step,
    split_model,
)

__all__ = [
    "BASE_PARAMS",
    "TARGET_MODULES",
    "AdapterError",
    "AdapterInfo",
    "AdapterRegistry",
    "CausalLM",
    "CheckpointError",
    "DatasetError",
    "DuplicateAdapterError",
    "DuplicateJobError",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FineTuneJob",
    "InvalidAdapterError",
    "InvalidPromptError",
    "InvalidSamplingParamsError",
    "JobRun",
    "KVCache",
    "LayerKV",
    "Llama3RopeScaling",
    "LoraAdapter",
    "LoraBatch",
    "LoraConfig",
    "LoraParam",
    "LoraScale",
    "LoraTable",
    "Metrics",
    "ModelConfig",
    "PageBatch",
    "PagePool",
    "PeftFormatError",
    "PromptTooLongError",
    "RankError",
    "RequestError",
    "RequestHandle",
    "RequestOutput",
    "Runtime",
    "RuntimeConfig",
    "SamplingParams",
    "ServeSequence",
    "ShapeMismatchError",
    "SloTargets",
    "SlotOptState",
    "SlotOptimizer",
    "SlotUpdate",
    "StepOutput",
    "StepPolicy",
    "StreamEvent",
    "TableFullError",
    "TargetModuleError",
    "TrainSequence",
    "TrainState",
    "UnifiedBatch",
    "UnknownAdapterError",
    "add_lora_tables",
    "init_kv_cache",
    "load_model",
    "load_peft_adapter",
    "lora_tables",
    "make_mesh",
    "make_unified_step",
    "save_peft_adapter",
    "shard_model",
    "split_model",
]
