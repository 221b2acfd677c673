"""The model with adapter tables: base behaviour without adapters, parameter filters, and
gradients w.r.t. the adapter tables (against PEFT's)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from loqjax import (
    BASE_PARAMS,
    AdapterRegistry,
    LoraBatch,
    LoraParam,
    add_lora_tables,
    load_model,
    lora_tables,
)
from pallas_kernels import token_slots

from hf_reference import CAPACITY, pack, rel_err

ARCH = "llama2"
NUM_SEGMENTS = 4


def _inputs(vocab_size, lengths, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, vocab_size, n, dtype=np.int32) for n in lengths]
    return seqs, pack(seqs, [0] * len(seqs))


def test_without_adapters_the_model_is_the_base(hf_models, loaded_models, lora_models, forward):
    model, _ = lora_models[ARCH]
    _, inputs = _inputs(hf_models[ARCH].vocab_size, [10, 12])
    np.testing.assert_array_equal(forward(model, *inputs), forward(loaded_models[ARCH][1], *inputs))


def test_filters_separate_adapter_and_base_params(loaded_models, lora_models):
    model, _ = lora_models[ARCH]
    config, base = loaded_models[ARCH]
    adapter_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, LoraParam))}
    assert len(adapter_paths) == 2 * len(lora_tables(model)) == 2 * 7 * config.num_layers
    assert all(path[-2] == "adapters" and path[-1] in ("a", "b") for path in adapter_paths)
    base_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, BASE_PARAMS))}
    assert base_paths == {path for path, _ in nnx.to_flat_state(nnx.state(base, nnx.Param))}


def _torch_lora_grads(peft_model, seq: np.ndarray, cotangent: np.ndarray) -> dict:
    """(layer, projection) -> (dA [d_in, r], dB [r, d_out]) of sum(logits * cotangent)
    for one sequence, in our layout."""
    logits = peft_model(
        input_ids=torch.as_tensor(seq, dtype=torch.long)[None],
        position_ids=torch.arange(len(seq))[None],
    ).logits[0]
    (logits * torch.as_tensor(cotangent)).sum().backward()
    grads = {}
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:  # ...layers.{i}.{parent}.{proj}.lora_{A|B}.default.weight
            *_, layer, _, proj, matrix, _, _ = name.split(".")
            grads.setdefault((int(layer), proj), {})[matrix] = param.grad.numpy().T
    peft_model.zero_grad(set_to_none=True)
    return {key: (g["lora_A"], g["lora_B"]) for key, g in grads.items()}


@functools.partial(jax.jit, static_argnums=0)
def _grad_lora_params(graphdef, params, rest, inputs, batch, cotangent):
    """Gradient of sum(logits * cotangent) w.r.t. the LoraParam state ``params``."""

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(*inputs, batch) * cotangent)

    return jax.grad(loss)(params)


def _lora_grads(model, inputs, batch, cotangent) -> dict:
    """(layer, projection) -> (dA [N, d_in, R], dB [N, R, d_out]), numpy."""
    graphdef, params, rest = nnx.split(model, LoraParam, ...)
    grads = _grad_lora_params(graphdef, params, rest, inputs, batch, cotangent)
    tables = lora_tables(nnx.merge(graphdef, grads, rest))
    return {key: (np.asarray(t.a[...]), np.asarray(t.b[...])) for key, t in tables.items()}


# (adapter, length) per packed sequence; the first sequence ends at row 6.
REQUESTS = [("qv", 6), (None, 5), ("mlp", 7)]


@pytest.mark.parametrize("grad_rows", [CAPACITY, 6])
def test_adapter_gradients(grad_rows, hf_models, peft_adapters, lora_models):
    """Gradients reach exactly the targeted projections of the adapters that serve rows
    before grad_rows, padded rank columns get none, and the values match PEFT's."""
    model, registry = lora_models[ARCH]
    vocab_size = hf_models[ARCH].vocab_size
    seqs, inputs = _inputs(vocab_size, [n for _, n in REQUESTS], seed=1)
    cotangent = np.random.default_rng(2).normal(size=(CAPACITY, vocab_size)).astype(np.float32)
    batch = registry.batch(REQUESTS, NUM_SEGMENTS, grad_rows=grad_rows)
    grads = _lora_grads(model, inputs, batch, cotangent)

    starts = np.cumsum([0] + [n for _, n in REQUESTS])
    # adapter -> index of its sequence, for adapters whose rows come before grad_rows
    trained = {name: k for k, (name, _) in enumerate(REQUESTS) if name and starts[k] < grad_rows}
    assert set(trained) == ({"qv"} if grad_rows == 6 else {"qv", "mlp"})
    for key, (da, db) in grads.items():
        for name, info in registry.adapters.items():
            ga, gb = da[info.slot], db[info.slot]
            assert not ga[:, info.rank :].any() and not gb[info.rank :].any(), "rank padding"
            expected = name in trained and key[1] in info.target_modules
            assert ga.any() == gb.any() == expected, (name, key)
        spare = sorted(set(range(len(da))) - {info.slot for info in registry.adapters.values()})
        assert not da[spare].any() and not db[spare].any()

    for name, k in trained.items():
        rows = slice(starts[k], starts[k + 1])
        ref = _torch_lora_grads(peft_adapters[ARCH][name].torch_model, seqs[k], cotangent[rows])
        info = registry.info(name)
        for key, (ref_a, ref_b) in ref.items():
            da, db = grads[key]
            for ours, theirs in (
                (da[info.slot, :, : info.rank], ref_a),
                (db[info.slot, : info.rank], ref_b),
            ):
                err = rel_err(ours, theirs)
                assert err < 1e-4, f"{name} {key}: rel err {err:.2e}"


def test_add_lora_tables_rejects_bad_arguments(hf_models):
    _, model = load_model(hf_models[ARCH].path)
    with pytest.raises(ValueError, match="no LoRA tables; call add_lora_tables"):
        AdapterRegistry(model)
    with pytest.raises(ValueError, match=r"non-empty subset of q_proj.*got \['qkv_proj'\]"):
        add_lora_tables(model, num_slots=2, max_rank=4, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="num_slots and max_rank must be >= 1"):
        add_lora_tables(model, num_slots=0, max_rank=4)
    add_lora_tables(model, num_slots=2, max_rank=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA tables"):
        add_lora_tables(model, num_slots=2, max_rank=4)


def test_lora_batch_pack():
    batch = LoraBatch.pack([3, 0, 5], [2, -1, 0], num_segments=5, grad_rows=3)
    np.testing.assert_array_equal(batch.seg_ends, [3, 3, 8, 8, 8])
    np.testing.assert_array_equal(batch.seg_slots, [2, -1, 0, -1, -1])
    assert batch.grad_rows == 3 and batch.seg_ends.dtype == batch.seg_slots.dtype == jnp.int32
    with pytest.raises(ValueError, match="3 sequences exceed num_segments=2"):
        LoraBatch.pack([1, 2, 3], [0, 0, 0], num_segments=2)
    with pytest.raises(ValueError, match="negative sequence length"):
        LoraBatch.pack([1, -2], [0, 0], num_segments=2)


def test_lora_batch_pack_merges_runs_of_one_slot():
    # Decode rows, one per sequence: a run of one adapter is one segment (row tiles never
    # straddle segments, so it can fill them), and every row keeps its slot.
    lengths, slots = [1, 1, 1, 2, 1, 1], [4, 4, -1, -1, 4, 1]
    batch = LoraBatch.pack_host(lengths, slots, num_segments=6)
    np.testing.assert_array_equal(batch.seg_ends, [2, 5, 6, 7, 7, 7])
    np.testing.assert_array_equal(batch.seg_slots, [4, -1, 4, 1, -1, -1])
    per_row = token_slots(batch.seg_ends, batch.seg_slots, num_rows=8, num_slots=5)
    np.testing.assert_array_equal(per_row, [4, 4, -1, -1, -1, 4, 1, -1])


def test_small_batch_plans_its_row_tiles_once_per_forward(hf_models, lora_models):
    """The small-batch SMLM forward's row tiles are planned once for every projection of
    every layer (``CausalLM.hidden``), not in each call, where sharing them would be left
    to XLA's CSE across the layers' nested jits. Every plan has one cummax. (Only the
    kernels plan tiles: the model here takes them, interpreted, whatever the backend.)"""
    model, _ = lora_models[ARCH]
    _, inputs = _inputs(hf_models[ARCH].vocab_size, [10, 12])
    batch = LoraBatch.pack([10, 12], [0, 1], NUM_SEGMENTS)
    graphdef, state = nnx.split(model)

    def forward(state):
        on_kernels = nnx.merge(graphdef, state)
        on_kernels.kernels = "pallas"
        return on_kernels(*inputs, batch)

    assert str(jax.make_jaxpr(forward)(state)).count("cummax") == 1
