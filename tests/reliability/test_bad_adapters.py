"""Bad adapters raise an ``AdapterError`` before anything is written and the engine still
serves correctly: unknown names, ranks above r_max, wrong shapes, dtypes or values, and
malformed PEFT directories (hypothesis-generated configs and weight files)."""

import dataclasses
import json
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loqjax import (
    AdapterError,
    InvalidAdapterError,
    LoraAdapter,
    RankError,
    ShapeMismatchError,
    UnknownAdapterError,
    load_peft_adapter,
    save_peft_adapter,
)
from loqjax.peft_format import CONFIG_FILE, WEIGHTS_FILE

from _reliability import ADAPTER, MAX_RANK, TRIED, table_snapshot

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _rejected(registry, call, error, match=None):
    """``call(registry)`` raises ``error`` and changes neither the tables nor the names."""
    before, adapters = table_snapshot(registry), dict(registry.adapters)
    with pytest.raises(error, match=match):
        call(registry)
    after = table_snapshot(registry)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert dict(registry.adapters) == adapters


def _good(registry, rank=2) -> LoraAdapter:
    """A valid rank-``rank`` adapter on q_proj of the served model."""
    rng = np.random.default_rng(rank)
    weights = {}
    for (layer, name), table in registry._tables.items():
        if name == "q_proj":
            a = rng.normal(size=(table.a.shape[1], rank)).astype(np.float32)
            weights[layer, name] = (a, rng.normal(size=(rank, table.b.shape[2])).astype("f4"))
    return LoraAdapter(rank, 4.0, weights)


def _edit_q0(adapter, edit) -> LoraAdapter:
    weights = dict(adapter.weights)
    weights[0, "q_proj"] = edit(*weights[0, "q_proj"])
    return dataclasses.replace(adapter, weights=weights)


# case -> (bad adapter for a registry, error, match)
EXPLICIT = {
    "rank above r_max": (lambda r: _good(r, MAX_RANK + 1), RankError, r"rank 5 .*\[1, 4\]"),
    "rank 0": (lambda r: dataclasses.replace(_good(r), rank=0), RankError, "outside"),
    "float rank": (lambda r: dataclasses.replace(_good(r), rank=2.0), RankError, "not an integer"),
    "string rank": (lambda r: dataclasses.replace(_good(r), rank="2"), RankError, "not an integer"),
    "nan alpha": (
        lambda r: dataclasses.replace(_good(r), alpha=math.nan),
        InvalidAdapterError,
        "alpha nan",
    ),
    "string alpha": (
        lambda r: dataclasses.replace(_good(r), alpha="4"),
        InvalidAdapterError,
        "alpha",
    ),
    "not an adapter": (lambda r: {"rank": 2}, InvalidAdapterError, "got dict"),
    "transposed A": (
        lambda r: _edit_q0(_good(r), lambda x, y: (x.T, y)),
        ShapeMismatchError,
        r"layers\.0\.self_attn\.q_proj: A \(2, 64\)",
    ),
    "list weights": (
        lambda r: _edit_q0(_good(r), lambda x, y: (x.tolist(), y)),
        InvalidAdapterError,
        "A is a list, not an array",
    ),
    "int weights": (
        lambda r: _edit_q0(_good(r), lambda x, y: (x, y.astype(np.int32))),
        InvalidAdapterError,
        "B has dtype int32; a float dtype",
    ),
    "string weights": (
        lambda r: _edit_q0(_good(r), lambda x, y: (x.astype(str), y)),
        InvalidAdapterError,
        "A has dtype <U",
    ),
    "complex weights": (
        lambda r: _edit_q0(_good(r), lambda x, y: (x.astype(np.complex64), y)),
        InvalidAdapterError,
        "complex64",
    ),
    "nan weights": (
        lambda r: _edit_q0(_good(r), lambda x, y: (x, y * np.nan)),
        InvalidAdapterError,
        "NaN or infinity",
    ),
    "inf weights": (
        lambda r: _edit_q0(_good(r), lambda x, y: (x * np.inf, y)),
        InvalidAdapterError,
        "NaN or infinity",
    ),
}


def test_explicit_bad_adapters_then_serves(engine, still_serves):
    registry = engine.registry
    for make, error, match in EXPLICIT.values():
        TRIED["explicit bad adapters"] += 1
        _rejected(registry, lambda r, make=make: r.load("bad", make(r)), error, match)
        _rejected(registry, lambda r, make=make: r.replace(ADAPTER, make(r)), error, match)
    TRIED["explicit bad adapters"] += 2
    _rejected(registry, lambda r: r.replace("nope", _good(r)), UnknownAdapterError, "'nope'")
    _rejected(registry, lambda r: r.unload("nope"), UnknownAdapterError, "'nope'")
    still_serves()
    bf16 = _edit_q0(_good(registry), lambda x, y: (x.astype(ml_dtypes.bfloat16), y))
    registry.load("bf16", bf16)  # bfloat16 is a float dtype
    registry.unload("bf16")
    still_serves()


DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int8, np.int64, bool]


@SETTINGS
@given(
    matrix=st.sampled_from([0, 1]),
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 80), min_size=1, max_size=3).map(tuple),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
)
def test_wrong_shape_dtype_or_values(engine, still_serves, matrix, dtype, shape, poison):
    """One of A/B of layer 0 q_proj is replaced by a random array; unless it happens to be
    valid, loading raises an AdapterError and writes nothing."""
    registry = engine.registry
    good = _good(registry)
    want = good.weights[0, "q_proj"][matrix].shape
    array = np.ones(shape, dtype)
    if poison is not None and array.size and np.issubdtype(array.dtype, np.inexact):
        array.flat[0] = poison
    elif shape == want and dtype not in (np.int8, np.int64, bool):
        return  # a valid adapter
    TRIED["adapter shapes, dtypes and values"] += 1
    bad = _edit_q0(
        good, lambda *pair: tuple(array if i == matrix else m for i, m in enumerate(pair))
    )
    _rejected(registry, lambda r: r.load("bad", bad), AdapterError)
    still_serves()


# --- malformed PEFT directories ------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
CONFIG_FIELDS = [
    "r",
    "lora_alpha",
    "target_modules",
    "peft_type",
    "bias",
    "use_rslora",
    "use_dora",
    "rank_pattern",
]


@pytest.fixture(scope="module")
def peft_dir(engine, tmp_path_factory):
    """A valid PEFT copy of a rank-2 q_proj adapter of the served model."""
    path = tmp_path_factory.mktemp("peft")
    save_peft_adapter(_good(engine.registry), path)
    load_peft_adapter(path)
    return path


def _load_or_reject(engine, path):
    """Loading a (possibly still valid) PEFT directory either works or raises an
    AdapterError, writing nothing; never anything else."""
    registry = engine.registry
    try:
        adapter = load_peft_adapter(path)
    except AdapterError:
        return
    try:
        _rejected(registry, lambda r: r.load("peft", adapter), AdapterError)
    except pytest.fail.Exception:  # it was valid after all
        registry.unload("peft")


@SETTINGS
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), JSON, min_size=1, max_size=3),
    drop=st.lists(st.sampled_from(CONFIG_FIELDS[:3]), max_size=1),
)
def test_malformed_peft_config(engine, still_serves, peft_dir, tmp_path_factory, changes, drop):
    path = tmp_path_factory.mktemp("bad-config")
    config = json.loads((peft_dir / CONFIG_FILE).read_text()) | changes
    for field in drop:
        config.pop(field, None)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    (path / WEIGHTS_FILE).write_bytes((peft_dir / WEIGHTS_FILE).read_bytes())
    TRIED["malformed PEFT configs"] += 1
    _load_or_reject(engine, path)
    still_serves()


@SETTINGS
@given(
    junk=st.binary(max_size=64),
    where=st.sampled_from(["config", "weights", "weights header", "weights tail"]),
)
def test_malformed_peft_files(engine, peft_dir, tmp_path_factory, junk, where):
    path = tmp_path_factory.mktemp("bad-files")
    config, weights = (peft_dir / CONFIG_FILE).read_bytes(), (peft_dir / WEIGHTS_FILE).read_bytes()
    if where == "config":
        config = junk
    elif where == "weights":
        weights = junk
    elif where == "weights header":
        weights = weights[:8] + junk + weights[8 + len(junk) :]
    else:
        weights = weights[: len(weights) - len(junk) - 1]
    (path / CONFIG_FILE).write_bytes(config)
    (path / WEIGHTS_FILE).write_bytes(weights)
    TRIED["malformed PEFT files"] += 1
    _load_or_reject(engine, path)


def test_peft_junk_then_serves(still_serves):
    still_serves()
