"""The unified runtime on the default model: a job trains under continuous serving load,
its adapter is served mid-training and after, and datasets fail clearly."""

import json
from pathlib import Path

import numpy as np
import pytest

from loqjax import AdapterRegistry, LoraBatch, add_lora_tables, load_model
from loqjax.jobs import DatasetError, FineTuneJob, LoraConfig, load_records
from loqjax.metrics import Metrics
from loqjax.runtime import Runtime, RuntimeConfig
from loqjax.tasks import DATA_DIR
from loqjax.tokenization import load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "default"
CONFIG = RuntimeConfig(
    train_rows=128, serve_rows=64, max_train_seqs=8, max_serve_seqs=4, min_train_share=0.5
)


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
        if not run.done and len(rt._requests) < 3:
            rt.submit("copy: abc =>", max_new_tokens=12)
            if run.updates == 5 and not mid:
                mid.append(rt.submit("upper: abc =>", "upper", max_new_tokens=3))

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


def test_training_never_starves(trained):
    runtime, *_ = trained
    log = [json.loads(line) for line in runtime.metrics.log_path.read_text().splitlines()]
    # Steps up to the one that made the last update (its "train" event precedes it).
    last_update = max(i for i, event in enumerate(log) if event["event"] == "train")
    steps = [event for event in log[: last_update + 2] if event["event"] == "step"]
    assert all(step["served"] for step in steps)  # a base request was always in flight
    assert all(step["trained"].get("upper", 0) >= 32 for step in steps)  # ~half of 128 rows
    assert [e["update"] for e in log if e["event"] == "train"] == list(range(1, 11))


def test_adapter_served_mid_training_and_after(trained):
    runtime, model, run, mid = trained
    assert mid and mid[0].done and len(mid[0].output_ids) == 3
    assert "upper" in runtime.registry.adapters  # promoted: the entry stays
    after = runtime.submit("upper: abc =>", "upper", max_new_tokens=1)
    runtime.run_until_idle()
    # The served token is the argmax of a plain forward with the trained adapter.
    runtime.sync_model()
    ids = np.asarray(after.prompt_ids, np.int32)
    n = len(ids)
    lora = LoraBatch.pack([n], [runtime.registry.info("upper").slot], 1)
    logits = model(ids, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), lora)
    assert after.output_ids == [int(np.argmax(logits[-1]))]
    assert np.any(runtime.registry.export("upper").weights[0, "q_proj"][1] != 0)


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
