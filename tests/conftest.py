"""Session fixtures: tiny random Hugging Face checkpoints and a shared jitted forward."""

from __future__ import annotations

import pytest
from flax import nnx

from loqjax import load_model

from hf_reference import HF_ARCHS, HFModel, make_torch_model


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
