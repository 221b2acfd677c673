"""The unified runtime on the default model: a job trains under continuous serving load,
its adapter is served mid-training and after, and datasets fail clearly."""

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest

from loqjax import (
    AdapterRegistry,
    EngineConfig,
    LoraBatch,
    SamplingParams,
    add_lora_tables,
    load_model,
)
from loqjax.engine import _InFlight
from loqjax.jobs import DatasetError, FineTuneJob, LoraConfig, load_records
from loqjax.metrics import Metrics
from loqjax.runtime import Runtime, RuntimeConfig, _UnifiedFlight
from loqjax.sampling import SamplingStages
from loqjax.tasks import DATA_DIR
from loqjax.tokenization import load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
SERVING = EngineConfig(token_capacity=64, max_seqs=4, page_size=8, num_pages=64, max_seq_len=128)
CONFIG = RuntimeConfig(serving=SERVING, train_rows=128, max_train_seqs=8, min_train_share=0.5)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A runtime that ran an 'upper' job with a base request always in flight, and what
    it saw each step: (training rows, serving requests) and mid-training requests."""
    _, model = load_model(DEFAULT_MODEL)
    add_lora_tables(model, num_slots=2, max_rank=4)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    metrics = Metrics(CONFIG.slo, tmp_path_factory.mktemp("runtime") / "metrics.jsonl")
    runtime = Runtime(
        model, AdapterRegistry(model), tokenizer, CONFIG, metrics=metrics, progress=False
    )
    job = FineTuneJob(
        "upper",
        DATA_DIR / "upper.jsonl",
        LoraConfig(rank=4, alpha=8.0),
        hyperparams={"learning_rate": 3e-3},
        steps=10,
        batch_tokens=128,
        eval_every=5,
    )
    run = runtime.add_job(job)
    mid = []

    def load(rt):
        if not run.done and rt.num_unfinished < 3:
            rt.submit("copy: abc =>", sampling=greedy(12))
        if run.updates >= 5 and not mid:
            mid.append(rt.submit("upper: abc =>", "upper", greedy(3)))

    runtime.run_until_idle(load)
    return runtime, model, run, mid


def test_loss_falls_under_serving_load(trained):
    runtime, _, run, _ = trained
    assert run.done and run.updates == 10
    assert run.train_loss[-1][1] < 0.7 * run.train_loss[0][1]
    assert [u for u, _ in run.eval_loss] == [0, 5, 10]
    assert run.eval_loss[-1][1] < 0.7 * run.eval_loss[0][1]
    summary = runtime.metrics.summary()
    assert summary["adapters"]["<base>"]["requests"] > 0
    assert summary["adapters"]["upper"]["training_tokens_per_s"] > 0


def test_training_keeps_its_share_under_serving_load(trained):
    """Serving never paused (a request was always in flight) and fine-tuning got at least
    its guaranteed half of the step time."""
    runtime, *_ = trained
    log = [json.loads(line) for line in runtime.metrics.log_path.read_text().splitlines()]
    # Steps up to the one that made the last update (its "train" event precedes it).
    last_update = max(i for i, event in enumerate(log) if event["event"] == "train")
    steps = [event for event in log[: last_update + 2] if event["event"] == "step"]
    assert all(step["served"] for step in steps[1:])  # the first only prefills
    training = sum(step["seconds"] for step in steps if step["kind"] == "unified")
    assert training >= CONFIG.min_train_share * sum(step["seconds"] for step in steps)
    assert [e["update"] for e in log if e["event"] == "train"] == list(range(1, 11))
    kinds = runtime.metrics.summary()["overall"]["step_kinds"]  # the log's, summed
    every_step = [event for event in log if event["event"] == "step"]
    assert sorted(kinds) == ["serve", "unified"]
    for kind, totals in kinds.items():
        seconds = [step["seconds"] for step in every_step if step["kind"] == kind]
        assert totals == {"steps": len(seconds), "seconds": pytest.approx(sum(seconds))}


def test_adapter_served_mid_training_and_after(trained):
    runtime, model, run, mid = trained
    assert mid and mid[0].done and len(mid[0].result().token_ids) == 3
    assert "upper" in runtime.registry.adapters  # promoted: the entry stays
    after = runtime.submit("upper: abc =>", "upper", greedy(1)).result()
    # The served token is the argmax of a plain forward with the trained adapter.
    runtime.sync_model()
    ids = np.asarray(after.prompt_token_ids, np.int32)
    n = len(ids)
    lora = LoraBatch.pack([n], [runtime.registry.info("upper").slot], 1)
    logits = model(ids, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), lora)
    assert after.token_ids == (int(np.argmax(logits[-1])),)
    assert np.any(runtime.registry.export("upper").weights[0, "q_proj"][1] != 0)


def test_warmup_runs_every_sampled_variant(trained, monkeypatch):
    """The sampler's stages are static: ``warmup(sampling=...)`` runs the serving buckets
    and the unified step on empty batches for every mix of the parameters' stages (the
    engine test ``test_mixed_batch_equals_each_request_alone`` checks that serving then
    compiles nothing), and counts each unified variant as compiled."""
    runtime, *_ = trained
    served, unified = [], []

    def run_unified(train, rows):
        unified.append(rows.sampling.stages)
        return types.SimpleNamespace(loss=np.zeros(2))

    monkeypatch.setattr(runtime, "_serve", lambda s, bucket, stages: served.append(stages))
    monkeypatch.setattr(runtime, "_run_unified", run_unified)
    penalty = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    nucleus = SamplingParams(temperature=0.8, top_p=0.9)
    runtime.warmup(sampling=[penalty, nucleus])
    mixes = SamplingStages.combinations([penalty, nucleus])
    assert len(mixes) == 4 and sorted(unified) == sorted(mixes)
    assert sorted(served) == sorted(mixes) * len(SERVING.token_buckets)
    assert {("unified", stages) for stages in mixes} <= runtime._ran


@pytest.mark.parametrize("pipeline", ["no_requests", "always"])
def test_serving_and_unified_steps_are_pipelined(trained, monkeypatch, pipeline):
    """A serving step's tokens are committed by the next call, which dispatches first, its
    rows taking them on the device. A unified step under serving load is pipelined so too
    ("always": dispatched behind the serving step in flight, its token committed by the
    next call) or lands the serving step first and itself at the end. Either way the
    request's tokens are those it gets served alone."""
    runtime, *_ = trained
    monkeypatch.setattr(runtime, "runtime_config", dataclasses.replace(CONFIG, pipeline=pipeline))
    job = FineTuneJob("lower", DATA_DIR / "upper.jsonl", LoraConfig(rank=4), steps=1)
    runtime.add_job(job)
    monkeypatch.setattr(runtime, "_wants_training", lambda *_: False)
    handle = runtime.submit("copy: abc =>", sampling=greedy(5))
    runtime.step()  # dispatches the prefill: its token is still on the device
    assert handle.output().token_ids == () and runtime._in_flight is not None
    runtime.step()  # dispatches the first decode step, commits the prefill's token
    assert len(handle.output().token_ids) == 1
    monkeypatch.setattr(runtime, "_wants_training", lambda *_: True)
    dispatch, dispatched = runtime._dispatch_unified, []
    monkeypatch.setattr(
        runtime,
        "_dispatch_unified",
        lambda *a: dispatched.append(runtime._in_flight) or dispatch(*a),
    )
    runtime.step()  # a unified step (training, and a decode)
    serving = dispatched[0]  # the decode step in flight, or landed before it
    assert serving is None if pipeline == "no_requests" else isinstance(serving, _InFlight)
    monkeypatch.setattr(runtime, "_dispatch_unified", dispatch)
    if pipeline == "always":  # its own token is in flight
        assert len(handle.output().token_ids) == 2 and runtime._in_flight.out is not None
        runtime.step()  # another unified step lands it
    assert len(handle.output().token_ids) == 3
    assert pipeline == "always" or runtime._in_flight is None
    monkeypatch.setattr(runtime, "_wants_training", Runtime._wants_training.__get__(runtime))
    runtime.run_until_idle()
    alone = runtime.submit("copy: abc =>", sampling=greedy(5)).result()
    assert handle.result().token_ids == alone.token_ids
    runtime.unload_adapter("lower")  # its slot, for the next parameter


def test_training_under_load_waits_for_a_run_to_fit(trained, monkeypatch):
    """Under load (pipelined) training starts only when ``unified_run`` unified steps in
    a row would meet every request's deadline for the run's last token, the first timed
    as one after a serving step and the others as queued ones; behind a unified step in
    flight, one more needs only its own token's deadline."""
    runtime, *_ = trained
    # Both kinds of unified step were timed while the job trained under load.
    assert set(runtime._unified_seconds) == {False, True}
    monkeypatch.setattr(runtime, "_wants_training", lambda *_: False)
    handle = runtime.submit("copy: abc =>", sampling=greedy(8))
    while len(handle.output().token_ids) < 2:
        runtime.step()
    runtime.land()
    monkeypatch.undo()
    (request,) = runtime._requests.values()
    due = CONFIG.slo.deadline(request.arrival, request.token_times)  # its next token
    tpot, margin = CONFIG.slo.tpot_s, runtime.policy.margin
    monkeypatch.setattr(runtime, "_unified_seconds", {False: 0.10, True: 0.08})
    monkeypatch.setattr(runtime, "_train_seconds", 1.0)  # its share guaranteed already
    monkeypatch.setattr(runtime, "_active_seconds", 1.0)
    for run, seconds in ((1, 0.10), (2, 0.18), (3, 0.26)):
        config = dataclasses.replace(CONFIG, pipeline="always", unified_run=run)
        monkeypatch.setattr(runtime, "runtime_config", config)
        latest = due + (run - 1) * tpot - margin * seconds
        assert runtime._wants_training(latest - 1e-6, pipeline=True)
        assert not runtime._wants_training(latest + 1e-6, pipeline=True)
        # Unified steps that land themselves do not queue: one at a time.
        assert runtime._wants_training(due - margin * 0.10 - 1e-6, pipeline=False)
        assert not runtime._wants_training(due - margin * 0.10 + 1e-6, pipeline=False)
    # A unified step in flight since 0.03 s before now: 0.07 s of it left, then 0.08 s.
    for now, trains in ((due - margin * 0.15 - 1e-6, True), (due - margin * 0.15 + 1e-6, False)):
        flight = _UnifiedFlight(None, None, (), None, (), None, started_at=now - 0.03, timed=True)
        monkeypatch.setattr(runtime, "_in_flight", flight)
        assert runtime._run_seconds(now, 1) == pytest.approx(0.07 + 0.08)
        assert runtime._wants_training(now, pipeline=True) == trains
    monkeypatch.undo()
    handle.cancel()
    runtime.run_until_idle()


def test_dataset_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: .*\['completion'\]"):
        load_records(path)
    path.write_text("not json\n")
    with pytest.raises(DatasetError, match="bad.jsonl:1: invalid JSON"):
        load_records(path)
    with pytest.raises(DatasetError, match="no records"):
        load_records([])
