"""Checkpoint loading: sharded and bf16 files, and clear errors for malformed checkpoints."""

import copy
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from loqjax import CheckpointError, Llama3RopeScaling, ModelConfig, load_model

from hf_reference import CAPACITY, HFModel, rel_err

ARCH = "llama2"  # untied: lm_head.weight is a tensor of its own


def _inputs(vocab_size):
    tokens = np.random.default_rng(3).integers(0, vocab_size, CAPACITY, dtype=np.int32)
    return tokens, np.arange(CAPACITY, dtype=np.int32), np.zeros(CAPACITY, np.int32)


@pytest.fixture
def ckpt(hf_models, tmp_path):
    """A writable copy of the fp32 single-file llama2 checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_models[ARCH].path, dst)
    return dst


def test_sharded_checkpoint_gives_same_logits(hf_models, loaded_models, forward, tmp_path):
    hf = hf_models[ARCH]
    hf.torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, sharded = load_model(tmp_path)
    inputs = _inputs(hf.vocab_size)
    np.testing.assert_array_equal(
        forward(sharded, *inputs), forward(loaded_models[ARCH][1], *inputs)
    )


def test_bf16_checkpoint(hf_models, forward, tmp_path):
    hf = hf_models[ARCH]
    inputs = _inputs(hf.vocab_size)
    state = {name: t.to(torch.bfloat16) for name, t in hf.torch_model.state_dict().items()}
    hf.torch_model.save_pretrained(
        tmp_path, safe_serialization=True, state_dict=dict(state)
    )  # it pops keys

    _, model = load_model(tmp_path, dtype=jnp.bfloat16)
    assert model.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
    ref = hf.logits(inputs[0], inputs[1])
    torch_bf16 = copy.deepcopy(hf.torch_model).to(torch.bfloat16)
    torch_err = rel_err(HFModel(torch_bf16, tmp_path).logits(inputs[0], inputs[1]), ref)
    err = rel_err(forward(model, *inputs), ref)
    # bf16 compute through these sharp random models drifts by a few percent, torch's too.
    assert err < 5e-2, f"bf16 rel err {err:.2e} (torch in bf16: {torch_err:.2e})"

    # Loaded as fp32, the bf16 weights must decode exactly: compare against torch in fp32
    # with the same bf16-rounded weights.
    _, model32 = load_model(tmp_path, dtype=jnp.float32)
    rounded = copy.deepcopy(hf.torch_model)
    rounded.load_state_dict({name: t.float() for name, t in state.items()})
    err = rel_err(
        forward(model32, *inputs), HFModel(rounded, tmp_path).logits(inputs[0], inputs[1])
    )
    assert err < 1e-4, f"bf16 weights loaded as fp32: rel err {err:.2e}"


def test_harmless_extra_tensor_is_ignored(ckpt, loaded_models, forward):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    _, model = load_model(ckpt)
    inputs = _inputs(loaded_models[ARCH][0].vocab_size)
    np.testing.assert_array_equal(forward(model, *inputs), forward(loaded_models[ARCH][1], *inputs))


def _rewrite(ckpt, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(t):
        t[name] = t[name][:, :-1].copy()

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(32, 63\), expected \(32, 64\)"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(2, np.float32)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra\.weight"
    ):
        load_model(ckpt)


def test_missing_shard(hf_models, tmp_path):
    hf_models[ARCH].torch_model.save_pretrained(
        tmp_path, safe_serialization=True, max_shard_size="50KB"
    )
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        load_model(tmp_path)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_model(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(ckpt)


def _edit_config(ckpt, **changes):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def test_unsupported_model_type(ckpt):
    _edit_config(ckpt, model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(ckpt)


def test_unsupported_rope_type(ckpt):
    _edit_config(ckpt, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        load_model(ckpt)


def test_config_from_hf(hf_models):
    configs = {arch: ModelConfig.from_hf(m.path) for arch, m in hf_models.items()}
    assert configs["llama2"] == ModelConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
    )
    assert configs["llama3"].rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    assert configs["llama3"].rope_theta == 500000.0
    assert configs["llama3"].tie_word_embeddings and configs["llama3"].num_kv_heads == 1
    assert configs["mistral"].sliding_window == 5 and configs["mistral"].head_dim == 8
    assert configs["qwen2"].attention_bias and configs["qwen2"].sliding_window is None
