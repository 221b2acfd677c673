"""Runtime slot management: load/unload/replace cycles without recompiling, and errors
that are raised before anything is written."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from loqjax import (
    AdapterRegistry,
    DuplicateAdapterError,
    LoraAdapter,
    RankError,
    ShapeMismatchError,
    TableFullError,
    TargetModuleError,
    UnknownAdapterError,
    add_lora_tables,
    load_model,
    lora_tables,
)
from loqjax.registry import write_slot

from hf_reference import pack, random_adapter

ARCH = "llama3"  # MQA and a tied head; the PEFT tests cover the others
NUM_SLOTS, MAX_RANK, NUM_SEGMENTS = 3, 8, 4
TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # no k_proj
LENGTHS = (7, 5, 9)

_traces = []


@nnx.jit
def counted_forward(model, tokens, positions, segment_ids, lora):
    _traces.append(None)  # runs once per trace, never per call
    return model(tokens, positions, segment_ids, lora)


@pytest.fixture
def served(hf_models):
    """A fresh model whose tables (no k_proj) hold "a" (slot 0) and "b" (slot 1)."""
    _, model = load_model(hf_models[ARCH].path)
    add_lora_tables(model, num_slots=NUM_SLOTS, max_rank=MAX_RANK, target_modules=TARGETS)
    registry = AdapterRegistry(model)
    registry.load("a", random_adapter(model, 4, 8.0, ("q_proj", "v_proj"), seed=1))
    b = random_adapter(model, 8, 4.0, ("o_proj", "gate_proj", "down_proj"), True, seed=2)
    registry.load("b", b)
    return model, registry


def _snapshot(model) -> dict:
    """Host copies of every table array, by (layer, projection, variable)."""
    return {
        (*key, var): np.array(getattr(table, var)[...])
        for key, table in lora_tables(model).items()
        for var in ("a", "b", "scale")
    }


def _assert_slots(before: dict, after: dict, slots, equal: bool = True):
    for key, array in before.items():
        for slot in slots:
            same = np.array_equal(array[slot], after[key][slot])
            assert same == equal, f"{key} slot {slot}"


def _assert_adapter_equal(ours: LoraAdapter, ref: LoraAdapter):
    assert (ours.rank, ours.alpha, ours.use_rslora) == (ref.rank, ref.alpha, ref.use_rslora)
    assert ours.weights.keys() == ref.weights.keys()
    for key, (a, b) in ref.weights.items():
        np.testing.assert_array_equal(ours.weights[key][0], a)
        np.testing.assert_array_equal(ours.weights[key][1], b)


def test_load_unload_replace_cycles(served, hf_models):
    model, registry = served
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, hf_models[ARCH].vocab_size, n, dtype=np.int32) for n in LENGTHS]
    inputs = pack(seqs, [0, 4, 0])
    offsets = np.cumsum((0, *LENGTHS))

    def run(*names):
        """Logits of each sequence, sequence k served by names[k] (None: base only)."""
        batch = registry.batch(list(zip(names, LENGTHS, strict=True)), NUM_SEGMENTS)
        logits = np.asarray(counted_forward(model, *inputs, batch))
        return [logits[offsets[k] : offsets[k + 1]] for k in range(len(LENGTHS))]

    first = run("a", None, "b")
    traces, writes = len(_traces), write_slot._cache_size()
    original = _snapshot(model)
    a, slot_a, slot_b = registry.export("a"), registry.info("a").slot, registry.info("b").slot

    registry.unload("a")
    unloaded = _snapshot(model)
    _assert_slots(original, unloaded, [slot_b, 2])
    assert not any(array[slot_a].any() for array in unloaded.values()), "unload zeroes the slot"
    after = run(None, None, "b")
    np.testing.assert_array_equal(after[2], first[2])
    np.testing.assert_array_equal(after[1], first[1])

    # A different rank and target set reuses the freed slot; b is replaced in place.
    c = random_adapter(model, 2, 3.0, ("up_proj", "o_proj"), seed=3)
    assert registry.load("c", c) == slot_a
    _assert_slots(unloaded, _snapshot(model), [slot_b, 2])
    loaded = _snapshot(model)
    b2 = random_adapter(model, 6, 6.0, ("q_proj", "v_proj", "up_proj"), seed=4)
    assert registry.replace("b", b2) == slot_b
    _assert_slots(loaded, _snapshot(model), [slot_a, 2])
    _assert_slots(loaded, _snapshot(model), [slot_b], equal=False)
    _assert_adapter_equal(registry.export("c"), c)
    _assert_adapter_equal(registry.export("b"), b2)
    mixed = run("c", None, "b")
    assert not np.array_equal(mixed[0], first[0]) and not np.array_equal(mixed[2], first[2])

    # Reloaded into the same slot, "a" serves exactly as before, next to the new "b".
    registry.unload("c")
    assert registry.load("a", a) == slot_a
    again = run("a", None, "b")
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[2], mixed[2])
    assert not any(array[2].any() for array in _snapshot(model).values()), "spare slot untouched"

    assert len(_traces) == traces, "slot updates retraced the forward"
    assert write_slot._cache_size() == writes, "slot writes recompiled"


def _qv(model, rank: int = 4, edit=None) -> LoraAdapter:
    """A random q/v adapter for ``model``; ``edit`` may change its weights dict in place."""
    adapter = random_adapter(model, rank, 8.0, ("q_proj", "v_proj"), seed=5)
    weights = dict(adapter.weights)
    if edit:
        edit(weights)
    return dataclasses.replace(adapter, weights=weights)


def _retarget_v(name):
    def edit(weights):
        for layer in (0, 1):
            weights[layer, name] = weights.pop((layer, "v_proj"))

    return edit


def _drop_layer_1_v(weights):
    del weights[1, "v_proj"]


def _add_layer_2_q(weights):
    weights[2, "q_proj"] = weights[0, "q_proj"]


def _shrink_layer_1_q_b(weights):
    a, b = weights[1, "q_proj"]
    weights[1, "q_proj"] = (a, b[:3])


# case -> (failing call on (model, registry), error, match)
FAILURES = {
    "unload unknown": (
        lambda m, r: r.unload("nope"),
        UnknownAdapterError,
        r"no adapter named 'nope' is loaded \(loaded: 'a', 'b'\)",
    ),
    "replace unknown": (lambda m, r: r.replace("nope", _qv(m)), UnknownAdapterError, "'nope'"),
    "export unknown": (lambda m, r: r.export("nope"), UnknownAdapterError, "'nope'"),
    "batch unknown": (
        lambda m, r: r.batch([("a", 3), ("nope", 2)], NUM_SEGMENTS),
        UnknownAdapterError,
        "'nope'",
    ),
    "duplicate": (
        lambda m, r: r.load("a", _qv(m)),
        DuplicateAdapterError,
        r"'a' is already loaded in slot 0; use replace\(\)",
    ),
    "rank above max": (
        lambda m, r: r.load("c", _qv(m, MAX_RANK + 1)),
        RankError,
        r"rank 9 is outside \[1, 8\]",
    ),
    "replace with bad rank": (
        lambda m, r: r.replace("a", _qv(m, MAX_RANK + 1)),
        RankError,
        "rank 9",
    ),
    "target not in tables": (
        lambda m, r: r.load("c", _qv(m, edit=_retarget_v("k_proj"))),
        TargetModuleError,
        r"targets \['q_proj', 'k_proj'\]; the tables hold \['q_proj', 'v_proj', 'o_proj'",
    ),
    "missing layer": (
        lambda m, r: r.load("c", _qv(m, edit=_drop_layer_1_v)),
        ShapeMismatchError,
        r"v_proj has weights for layers \[0\]; the base model has layers 0..1",
    ),
    "extra layer": (
        lambda m, r: r.load("c", _qv(m, edit=_add_layer_2_q)),
        ShapeMismatchError,
        r"q_proj has weights for layers \[0, 1, 2\]",
    ),
    "wrong projection size": (
        lambda m, r: r.load("c", _qv(m, edit=_retarget_v("down_proj"))),
        ShapeMismatchError,
        r"layers\.0\.mlp\.down_proj: A \(64, 4\) and B \(4, 16\); "
        r"the base model needs A \(96, 4\) and B \(4, 64\)",
    ),
    "inconsistent rank": (
        lambda m, r: r.load("c", _qv(m, edit=_shrink_layer_1_q_b)),
        ShapeMismatchError,
        r"layers\.1\.self_attn\.q_proj: A \(64, 4\) and B \(3, 64\)",
    ),
}


@pytest.mark.parametrize("case", FAILURES)
def test_errors_write_nothing(case, served):
    call, error, match = FAILURES[case]
    model, registry = served
    before, adapters = _snapshot(model), dict(registry.adapters)
    with pytest.raises(error, match=match):
        call(model, registry)
    _assert_slots(before, _snapshot(model), range(NUM_SLOTS))
    assert dict(registry.adapters) == adapters


def test_table_full(served):
    model, registry = served
    registry.load("c", _qv(model))
    before, adapters = _snapshot(model), dict(registry.adapters)
    with pytest.raises(TableFullError, match="all 3 slots are taken; unload an adapter"):
        registry.load("d", _qv(model))
    _assert_slots(before, _snapshot(model), range(NUM_SLOTS))
    assert dict(registry.adapters) == adapters
