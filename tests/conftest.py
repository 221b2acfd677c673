"""Session fixtures: tiny random Hugging Face checkpoints and PEFT adapters, models with
adapter tables, and shared jitted forwards."""

from __future__ import annotations

import contextlib

import jax
import pytest
from flax import nnx

from loqjax import AdapterRegistry, add_lora_tables, load_model, load_peft_adapter

from hf_reference import (
    HF_ARCHS,
    LORA_ARCHS,
    LORA_MAX_RANK,
    LORA_NUM_SLOTS,
    PEFT_ADAPTERS,
    HFModel,
    make_peft_model,
    make_torch_model,
)


@pytest.fixture
def cuda_lowering():
    """Lowering for CUDA on a machine without a GPU: newer JAX reads the target GPU (its
    compute capability) from an abstract device of an abstract mesh, and older JAX needs
    none."""
    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    if abstract_device is None or jax.default_backend() == "gpu":
        context = contextlib.nullcontext()
    else:
        device = abstract_device(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        context = jax.sharding.use_abstract_mesh(mesh)
    with context:
        yield


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, HFModel]:
    models = {}
    for arch in HF_ARCHS:
        model = make_torch_model(arch)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path, safe_serialization=True)
        models[arch] = HFModel(model, path)
    return models


@pytest.fixture(scope="session")
def forward():
    """Jitted ``model(tokens, positions, segment_ids)``, shared so compiles are reused."""
    return nnx.jit(
        lambda model, tokens, positions, segment_ids: model(tokens, positions, segment_ids)
    )


@pytest.fixture(scope="session")
def loaded_models(hf_models) -> dict:
    """arch -> (ModelConfig, CausalLM) loaded in float32 from the saved checkpoint."""
    return {arch: load_model(m.path) for arch, m in hf_models.items()}


@pytest.fixture(scope="session")
def lora_forward():
    """Jitted ``model(tokens, positions, segment_ids, lora)``, shared so compiles are reused."""
    return nnx.jit(
        lambda model, tokens, positions, segment_ids, lora: model(
            tokens, positions, segment_ids, lora
        )
    )


@pytest.fixture(scope="session")
def peft_adapters(hf_models, tmp_path_factory) -> dict[str, dict[str, HFModel]]:
    """arch -> adapter name -> the PEFT model with that adapter alone and the directory
    its ``save_pretrained`` wrote; for every LORA_ARCHS and PEFT_ADAPTERS entry."""
    adapters = {}
    for arch in LORA_ARCHS:
        adapters[arch] = {}
        for seed, name in enumerate(PEFT_ADAPTERS):
            model = make_peft_model(hf_models[arch].torch_model, name, seed)
            path = tmp_path_factory.mktemp(f"{arch}-{name}")
            model.save_pretrained(path)
            adapters[arch][name] = HFModel(model, path)
    return adapters


@pytest.fixture(scope="session")
def lora_models(hf_models, peft_adapters) -> dict:
    """arch -> (CausalLM, AdapterRegistry) with every PEFT adapter loaded from disk, in
    PEFT_ADAPTERS order. Read-only: tests that change slots build their own model."""
    models = {}
    for arch, adapters in peft_adapters.items():
        _, model = load_model(hf_models[arch].path)
        add_lora_tables(model, num_slots=LORA_NUM_SLOTS, max_rank=LORA_MAX_RANK)
        registry = AdapterRegistry(model)
        for name, adapter in adapters.items():
            registry.load(name, load_peft_adapter(adapter.path))
        models[arch] = model, registry
    return models
