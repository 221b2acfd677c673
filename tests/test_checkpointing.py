"""Orbax checkpoints of adapters and jobs: bit-exact round trips, loading into a registry
and engine of another process and another slot, PEFT export, retention, default paths,
a save killed mid-write, bad or foreign checkpoints refused without touching the live
slot, and a job resumed in a fresh process bit-identical to one never stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from loqjax import (
    AdapterRegistry,
    Engine,
    EngineConfig,
    SamplingParams,
    add_lora_tables,
    load_model,
    load_peft_adapter,
    lora_tables,
)
from loqjax.ckpt import (
    ENV_VAR,
    AdapterCheckpoints,
    CheckpointRestoreError,
    JobCheckpoints,
    Retention,
)
from loqjax.optim import SlotOptimizer
from loqjax.unified import TrainState, split_model

import _kill_during_save
import _resume_job
from hf_reference import LORA_MAX_RANK, LORA_NUM_SLOTS, PEFT_ADAPTERS

ARCH = "llama2"
TESTS = Path(__file__).resolve().parent
# Subprocesses import this checkout's packages, whatever is installed.
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")])),
}
SLOT = {name: slot for slot, name in enumerate(PEFT_ADAPTERS)}  # conftest load order


def _assert_adapters_equal(ours, ref):
    assert (ours.rank, ours.alpha, ours.use_rslora) == (ref.rank, ref.alpha, ref.use_rslora)
    assert ours.weights.keys() == ref.weights.keys()
    for key, (a, b) in ref.weights.items():
        assert ours.weights[key][0].tobytes() == np.asarray(a).tobytes(), key
        assert ours.weights[key][1].tobytes() == np.asarray(b).tobytes(), key


def _table_bytes(model) -> dict:
    """Every table array's bytes: a failed load must leave them all as they were."""
    return {
        key: tuple(np.asarray(v[...]).tobytes() for v in (t.a, t.b, t.scale))
        for key, t in lora_tables(model).items()
    }


def _run(args: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, ``env`` added to ``SUBPROCESS_ENV``."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
        env={**SUBPROCESS_ENV, **(env or {})},
        **kwargs,
    )


@pytest.fixture(scope="module")
def source(lora_models):
    """(model, registry) with every PEFT adapter loaded; read-only."""
    return lora_models[ARCH]


@pytest.fixture(scope="module")
def saved(source, tmp_path_factory) -> Path:
    """A pristine checkpoint directory: step 0 holds "all_rs", step 1 "qv"."""
    directory = tmp_path_factory.mktemp("saved")
    model, registry = source
    with AdapterCheckpoints(model, "unused", directory=directory) as ckpts:
        ckpts.save(registry.export("all_rs"))
        ckpts.save(registry.export("qv"))
    return directory


@pytest.fixture(scope="module")
def live(hf_models, peft_adapters):
    """(model, registry) of the same base serving "kou" and "all_rs"; only failed loads
    may touch it."""
    _, model = load_model(hf_models[ARCH].path)
    add_lora_tables(model, num_slots=LORA_NUM_SLOTS, max_rank=LORA_MAX_RANK)
    registry = AdapterRegistry(model)
    for name in ("kou", "all_rs"):
        registry.load(name, load_peft_adapter(peft_adapters[ARCH][name].path))
    return model, registry


def test_round_trip_is_bit_exact_and_records_the_config(source, tmp_path):
    model, registry = source
    keep_all = Retention(keep_last=None)
    with AdapterCheckpoints(model, "x", directory=tmp_path, retention=keep_all) as ckpts:
        for name in PEFT_ADAPTERS:
            step = ckpts.save(registry.export(name))
            # No wait: a read waits for the pending write itself.
            _assert_adapters_equal(ckpts.restore(step), registry.export(name))
        assert ckpts.steps == list(range(len(PEFT_ADAPTERS)))
        with pytest.raises(ValueError, match="already exists"):
            ckpts.save(registry.export("qv"), step=0)
    meta = json.loads((tmp_path / str(SLOT["all_rs"]) / "meta" / "metadata").read_text())
    record = meta["adapter"]
    assert meta["format"] == "loqjax.adapter.v1"
    assert (record["rank"], record["alpha"], record["use_rslora"]) == (8, 16.0, True)
    assert record["target_modules"] == list(PEFT_ADAPTERS["all_rs"][2])
    assert record["scale"] == 16 / 8**0.5
    assert record["base"]["config"]["vocab_size"] == model.config.vocab_size


def test_the_base_id_ignores_the_load_dtype(source, hf_models, tmp_path):
    """An adapter saved from float32 tables loads into bfloat16 tables of the same base
    (cast as any adapter is); bfloat16 weights round-trip as they are."""
    model, registry = source
    _, bf16 = load_model(hf_models[ARCH].path, jnp.bfloat16)
    add_lora_tables(bf16, num_slots=2, max_rank=LORA_MAX_RANK)
    bf16_registry = AdapterRegistry(bf16)
    with AdapterCheckpoints(model, "x", directory=tmp_path / "f32") as ckpts:
        ckpts.save(registry.export("all_rs"))
    with AdapterCheckpoints(bf16, "x", directory=tmp_path / "f32") as ckpts:
        ckpts.load(bf16_registry, "all_rs")
    exported = bf16_registry.export("all_rs")
    with AdapterCheckpoints(bf16, "x", directory=tmp_path / "bf16") as ckpts:
        ckpts.save(exported)
        restored = ckpts.restore()
    assert restored.weights[0, "q_proj"][0].dtype == jnp.bfloat16
    _assert_adapters_equal(restored, exported)


# The engine tests' shapes, so the compiled serving step is shared within a session.
ENGINE_CONFIG = EngineConfig(
    token_capacity=32, max_seqs=8, page_size=4, num_pages=128, max_seq_len=64
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPT = [5, 17, 3, 42, 8, 1, 29]

# Run as `python -c`: loads the checkpoint into a fresh registry, serves the prompt,
# writes the loaded weights by "layer.projection.matrix" and prints slot and tokens.
_LOAD_IN_ANOTHER_PROCESS = """
import json, sys
import numpy as np
from loqjax import AdapterRegistry, Engine, EngineConfig, SamplingParams
from loqjax import add_lora_tables, load_model
from loqjax.ckpt import AdapterCheckpoints
model_dir, ckpt_dir, out = sys.argv[1:]
_, model = load_model(model_dir)
add_lora_tables(model, num_slots={num_slots}, max_rank={max_rank})
registry = AdapterRegistry(model)
with AdapterCheckpoints(model, "kou", directory=ckpt_dir) as ckpts:
    slot = ckpts.load(registry, "kou")
engine = Engine(model, registry, config=EngineConfig(**{config}))
greedy = SamplingParams(temperature=0.0, max_tokens={max_tokens})
tokens = engine.submit({prompt}, "kou", greedy).result().token_ids
weights = registry.export("kou").weights
arrays = {{f"{{l}}.{{n}}.{{m}}": w for (l, n), ab in weights.items() for m, w in zip("ab", ab)}}
np.savez(out, **arrays)
print(json.dumps({{"slot": slot, "tokens": list(tokens)}}))
"""


def test_adapter_from_a_running_engine_serves_alike_in_another_process(source, hf_models, tmp_path):
    """Saved from an engine's registry, loaded by a fresh process into another slot of
    another registry: same weights bit for bit, same greedy tokens."""
    engine = Engine(*source, config=ENGINE_CONFIG)
    want = engine.submit(PROMPT, "kou", GREEDY).result().token_ids
    adapter = engine.registry.export("kou")
    with AdapterCheckpoints(source[0], "kou", directory=tmp_path / "kou") as ckpts:
        ckpts.save(adapter, metrics={"eval_loss": 0.5})

    snippet = _LOAD_IN_ANOTHER_PROCESS.format(
        num_slots=LORA_NUM_SLOTS,
        max_rank=LORA_MAX_RANK,
        config=dict(vars(ENGINE_CONFIG)),
        max_tokens=GREEDY.max_tokens,
        prompt=PROMPT,
    )
    args = [hf_models[ARCH].path, tmp_path / "kou", tmp_path / "out.npz"]
    proc = _run(["-c", snippet, *map(str, args)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["slot"] != engine.registry.info("kou").slot
    assert tuple(got["tokens"]) == want
    weights = np.load(tmp_path / "out.npz")
    for (layer, name), ab in adapter.weights.items():
        for matrix, w in zip("ab", ab, strict=True):
            assert weights[f"{layer}.{name}.{matrix}"].tobytes() == w.tobytes()


def test_export_peft_from_a_checkpoint(source, saved, peft_adapters, tmp_path):
    with AdapterCheckpoints(source[0], "x", directory=saved) as ckpts:
        ckpts.export_peft(tmp_path / "peft", step=0)
    _assert_adapters_equal(
        load_peft_adapter(tmp_path / "peft"), load_peft_adapter(peft_adapters[ARCH]["all_rs"].path)
    )


def test_retention_keeps_the_newest_and_the_best(source, tmp_path):
    model, registry = source
    adapter = registry.export("qv")
    losses = [3.0, 1.0, 4.0, 5.0, 2.0]
    retention = Retention(keep_last=2, keep_best=1, metric="eval_loss", mode="min")
    with AdapterCheckpoints(model, "x", directory=tmp_path / "best", retention=retention) as c:
        for loss in losses:
            c.save(adapter, metrics={"eval_loss": loss})
        assert c.steps == [1, 3, 4]
        assert (c.best_step, c.latest_step) == (1, 4)
    with AdapterCheckpoints(model, "x", directory=tmp_path / "last") as c:
        for _ in losses:
            c.save(adapter)
        assert c.steps == [2, 3, 4]  # Retention() keeps the last 3
        assert c.best_step is None


def test_default_directories_and_their_override(source, monkeypatch, tmp_path):
    model, _ = source
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    with AdapterCheckpoints(model, "poet") as ckpts:
        assert ckpts.directory == tmp_path / "checkpoints" / "adapters" / "poet"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    with JobCheckpoints(model, SlotOptimizer(), "poet-sft") as jobs:
        assert jobs.directory == tmp_path / "elsewhere" / "jobs" / "poet-sft"
    with AdapterCheckpoints(model, "poet", directory=tmp_path / "mine") as ckpts:
        assert ckpts.directory == tmp_path / "mine"
    for name in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="plain directory name"):
            AdapterCheckpoints(model, name)


def test_a_save_killed_mid_write_leaves_the_previous_step(tmp_path):
    """SIGKILL while step 1 (44 MB) is being written: step 0 stays the newest and restores
    exactly; only a temporary directory is left, and saving step 1 again works."""
    directory = tmp_path / "big"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "_kill_during_save.py"), str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=SUBPROCESS_ENV,
    )
    try:
        assert proc.stdout.readline().strip() == "saved 0"
        # save() returned before the write finished: it is asynchronous.
        assert proc.stdout.readline().strip() == "returned false"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in directory.iterdir()) == ["0", "1.orbax-checkpoint-tmp"]

    model = _kill_during_save.base_model()
    with AdapterCheckpoints(model, "big", directory=directory) as ckpts:
        assert ckpts.steps == [0]
        small = _kill_during_save.adapter(model, _kill_during_save.SMALL_RANK)
        _assert_adapters_equal(ckpts.restore(), small)
        ckpts.save(small, step=1)
        assert ckpts.steps == [0, 1]
    assert sorted(p.name for p in directory.iterdir()) == ["0", "1"]


def _array_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "adapter").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return files


def _delete_arrays(step_dir: Path):
    for path in _array_files(step_dir):
        path.unlink()


def _truncate_arrays(step_dir: Path):
    for path in _array_files(step_dir):
        os.truncate(path, path.stat().st_size // 2)


def _edit_meta(**changes):
    def edit(step_dir: Path):
        path = step_dir / "meta" / "metadata"
        meta = json.loads(path.read_text())
        meta["adapter"].update(changes)
        path.write_text(json.dumps(meta))

    return edit


CORRUPTIONS = {
    "deleted arrays": (_delete_arrays, r"cannot read the 'adapter' (metadata|arrays)"),
    "truncated arrays": (_truncate_arrays, r"cannot read the 'adapter' (metadata|arrays)"),
    "no metadata": (lambda d: shutil.rmtree(d / "meta"), r"cannot read its metadata"),
    "garbled metadata": (
        lambda d: (d / "meta" / "metadata").write_text("{"),
        r"cannot read its metadata",
    ),
    "no config": (_edit_meta(rank=None), r"rank=None is not a positive integer"),
    "wrong shapes": (
        _edit_meta(rank=7, scale=16 / 7**0.5),
        r"array layers\.0\.q_proj\.a has shape \(64, 8\), expected \(64, 7\)",
    ),
    "scale off": (_edit_meta(scale=1.0), r"scale=1\.0 does not follow from rank and alpha"),
    "unknown target": (_edit_meta(target_modules=["lm_head"]), r"target_modules=\['lm_head'\]"),
}


# After a failed read, a tensorstore callback may find orbax's event loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_checkpoint_is_refused_and_the_slot_kept(live, saved, tmp_path, corruption):
    corrupt, message = CORRUPTIONS[corruption]
    directory = shutil.copytree(saved, tmp_path / "copy")
    corrupt(directory / "0")
    model, registry = live
    before = _table_bytes(model)
    with AdapterCheckpoints(model, "x", directory=directory) as ckpts:
        with pytest.raises(CheckpointRestoreError, match=message):
            ckpts.load(registry, "all_rs", step=0, replace=True)
        assert ckpts.restore(1).rank == PEFT_ADAPTERS["qv"][0]  # the other step is fine
    assert _table_bytes(model) == before


def test_missing_steps_are_named(live, saved, tmp_path):
    model, registry = live
    with AdapterCheckpoints(model, "x", directory=saved) as ckpts:
        with pytest.raises(CheckpointRestoreError, match=r"no step 7 \(steps: \[0, 1\]\)"):
            ckpts.load(registry, "all_rs", step=7, replace=True)
    with AdapterCheckpoints(model, "x", directory=tmp_path) as ckpts:
        with pytest.raises(CheckpointRestoreError, match="no checkpoints"):
            ckpts.restore()


def test_a_checkpoint_of_another_base_is_refused(live, lora_models, hf_models, tmp_path):
    model, registry = live
    before = _table_bytes(model)
    # Another architecture whose projections happen to have the same shapes.
    qwen, qwen_registry = lora_models["qwen2"]
    with AdapterCheckpoints(qwen, "x", directory=tmp_path / "qwen") as ckpts:
        ckpts.save(qwen_registry.export("all_rs"))
    # The same architecture with other weights (a fine-tune of the base, say).
    _, tuned = load_model(hf_models[ARCH].path)
    tuned.norm.scale[...] = tuned.norm.scale[...] * 1.01
    with AdapterCheckpoints(tuned, "x", directory=tmp_path / "tuned") as ckpts:
        ckpts.save(registry.export("all_rs"))

    for directory, message in [
        ("qwen", r"another architecture: attention_bias=True \(this base: False\)"),
        ("tuned", r"another base model with the same architecture"),
    ]:
        with AdapterCheckpoints(model, "x", directory=tmp_path / directory) as ckpts:
            with pytest.raises(CheckpointRestoreError, match=message):
                ckpts.load(registry, "all_rs", replace=True)
    assert _table_bytes(model) == before


def test_rank_above_the_tables_max_rank_is_refused(hf_models, peft_adapters, saved):
    _, model = load_model(hf_models[ARCH].path)
    add_lora_tables(model, num_slots=2, max_rank=4)
    registry = AdapterRegistry(model)
    registry.load("qv", load_peft_adapter(peft_adapters[ARCH]["qv"].path))
    before = _table_bytes(model)
    with AdapterCheckpoints(model, "x", directory=saved) as ckpts:
        with pytest.raises(CheckpointRestoreError, match=r"rank 8 is outside \[1, 4\]"):
            ckpts.load(registry, "qv", step=0, replace=True)
        with pytest.raises(CheckpointRestoreError, match=r"rank 8 is outside \[1, 4\]"):
            ckpts.load(registry, "new", step=0)
        assert _table_bytes(model) == before
        assert ckpts.load(registry, "qv2", step=1) == 1  # rank 4 fits
    assert registry.adapters.keys() == {"qv", "qv2"}


def test_job_checkpoint_round_trip_and_mismatches(hf_models, tmp_path):
    """A job saved before any step: config, raw RNG key and data position come back;
    another optimizer or other tables are refused."""
    model, registry = _resume_job.build(hf_models[ARCH].path)
    adapter = _resume_job.initial_adapter(model)
    registry.load("poet", adapter)
    _, _, params = split_model(model)
    optimizer = _resume_job.OPTIMIZER
    state = TrainState.create(params, optimizer)
    raw_key = np.array([7, 11], np.uint32)
    with JobCheckpoints(model, optimizer, "poet", directory=tmp_path) as jobs:
        jobs.save(
            0, state, registry.info("poet"), data_position={"epoch": 1, "row": 5}, rng=raw_key
        )
        job = jobs.restore()
    assert (job.step, job.data_position) == (0, {"epoch": 1, "row": 5})
    assert np.asarray(job.rng).tolist() == [7, 11]
    _assert_adapters_equal(job.adapter, adapter)
    assert int(job.opt.num_tokens) == 0
    with pytest.raises(ValueError, match=r"slot 3 is outside \[0, 3\)"):
        job.install(state, 3)

    with JobCheckpoints(model, SlotOptimizer(optax.sgd(0.1)), "x", directory=tmp_path) as jobs:
        with pytest.raises(CheckpointRestoreError, match="'optimizer': missing arrays"):
            jobs.restore()
    for max_rank, message in [
        (
            8,
            r"'optimizer': array .*adapters\.a has shape \(\d+, \d+, 4\), expected \(\d+, \d+, 8\)",
        ),
        (2, r"the adapter \(rank 3, .*\) does not fit the tables \(max_rank 2"),
    ]:
        other, _ = _resume_job.build(hf_models[ARCH].path, max_rank)
        with JobCheckpoints(other, optimizer, "x", directory=tmp_path) as jobs:
            with pytest.raises(CheckpointRestoreError, match=message):
                jobs.restore()
    with pytest.raises(ValueError, match="data_position must be a JSON value"):
        with JobCheckpoints(model, optimizer, "x", directory=tmp_path / "bad") as jobs:
            jobs.save(1, state, registry.info("poet"), data_position=object())


def test_resumed_job_is_bit_identical_to_one_never_stopped(hf_models, tmp_path):
    """K steps, a job checkpoint (mid-accumulation), M more: against restoring that
    checkpoint in a fresh process, into another slot, and training the same M steps.
    Every params and optimizer array of the slot must match bit for bit. The two
    processes share a compilation cache, which saves the second one the compile."""
    k, m = 3, 3
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    model_dir, job_dir = str(hf_models[ARCH].path), str(tmp_path / "job")
    script = str(TESTS / "_resume_job.py")
    for args in [
        ["straight", model_dir, job_dir, str(k), str(m), str(tmp_path / "straight.npz")],
        ["resume", model_dir, job_dir, str(m), str(tmp_path / "resumed.npz")],
    ]:
        proc = _run([script, *args], env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr

    straight, resumed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert straight["slot"] != resumed["slot"]
    assert straight.files == resumed.files
    for path in straight.files:
        if path != "slot":
            assert straight[path].tobytes() == resumed[path].tobytes(), path

    # What the checkpoint held: the job's step, data position, key, hyperparameters and
    # the gradient of step K - 1, accumulated but not applied yet.
    model, _ = _resume_job.build(hf_models[ARCH].path)
    with JobCheckpoints(model, _resume_job.OPTIMIZER, "poet", directory=job_dir) as jobs:
        job = jobs.restore()
    assert job.step == k and job.data_position > 0
    assert str(job.rng.dtype) == "key<fry>"
    assert np.float32(job.opt.inner.hyperparams["learning_rate"]) == np.float32(
        _resume_job.LEARNING_RATE
    )
    assert int(job.opt.num_tokens) > 0 and int(job.opt.inner.count) == 1
    trained = straight["opt.inner.count"]
    assert trained == (k + m) // 2
