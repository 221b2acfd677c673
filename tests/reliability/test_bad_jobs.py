"""Bad fine-tuning input raises clearly and changes nothing: junk JSONL datasets and
records (hypothesis), a second job for an adapter being trained, and bad runtime requests."""

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loqjax import (
    DatasetError,
    DuplicateJobError,
    FineTuneJob,
    InvalidPromptError,
    InvalidSamplingParamsError,
    LoraConfig,
    PromptTooLongError,
    UnknownAdapterError,
)
from loqjax.jobs import load_records

from _reliability import RUNTIME_CONFIG, TRIED, make_runtime, table_snapshot

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
RECORDS = [{"prompt": f"upper: {w} =>", "completion": f" {w.upper()}"} for w in ("ab", "cd", "ef")]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def bad_records(draw):
    """A record that is not an object, or lacks a string prompt or completion."""
    kind = draw(st.sampled_from(["not an object", "missing field", "non-string field"]))
    if kind == "not an object":
        return draw(JSON.filter(lambda v: not isinstance(v, dict)))
    record = dict(draw(st.sampled_from(RECORDS))) | draw(st.dictionaries(st.text(max_size=8), JSON))
    field = draw(st.sampled_from(["prompt", "completion"]))
    if kind == "missing field":
        record.pop(field)
    else:
        record[field] = draw(JSON.filter(lambda v: not isinstance(v, str)) | st.just("a\ud800"))
    return record


@SETTINGS
@given(records=st.lists(bad_records(), min_size=1, max_size=3), good=st.integers(0, 3))
def test_junk_records(tmp_path_factory, records, good):
    """Valid records before the bad ones; as a list and as a JSONL file, the first bad
    record is named."""
    TRIED["junk dataset records"] += 1
    rows = RECORDS[:good] + records
    with pytest.raises(DatasetError, match=rf"^record {good}: "):
        load_records(rows)
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match=rf"d\.jsonl:{good + 1}: "):
        load_records(path)


@SETTINGS
@given(junk=st.binary(min_size=1, max_size=40))
def test_junk_jsonl_bytes(tmp_path_factory, junk):
    """Arbitrary bytes after a valid line: a DatasetError unless they happen to be records."""
    TRIED["junk JSONL bytes"] += 1
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + junk)
    try:
        records = load_records(path)
    except DatasetError:
        return
    assert records[0].prompt == RECORDS[0]["prompt"]


def test_dataset_of_another_type():
    TRIED["junk dataset records"] += 2
    with pytest.raises(DatasetError, match="got int"):
        load_records(42)
    with pytest.raises(DatasetError, match="has no records"):
        load_records([])


@pytest.fixture(scope="module")
def runtime():
    """A runtime training "upper" (never stepped, so the job stays running); the fault and
    load tests' runtime (``make_runtime``), sharing its compiled steps."""
    runtime = make_runtime()
    runtime.add_job(FineTuneJob("upper", RECORDS, LoraConfig(rank=4), steps=50))
    return runtime


def _unchanged(runtime, call, error, match):
    runtime.sync_model()
    tables, adapters = table_snapshot(runtime.registry), dict(runtime.registry.adapters)
    jobs = {name: (run, run.updates) for name, run in runtime.jobs.items()}
    with pytest.raises(error, match=match):
        call()
    runtime.sync_model()
    after = table_snapshot(runtime.registry)
    assert all((tables[k] == after[k]).all() for k in tables)
    assert dict(runtime.registry.adapters) == adapters
    assert {name: (run, run.updates) for name, run in runtime.jobs.items()} == jobs
    assert not runtime.idle and not runtime._requests  # the job still runs; nothing queued


def test_second_job_for_an_adapter_in_training(runtime):
    TRIED["duplicate fine-tuning jobs"] += 2
    for dataset in (RECORDS, [{"prompt": "x"}]):  # the running job is named first
        _unchanged(
            runtime,
            lambda d=dataset: runtime.add_job(FineTuneJob("upper", d, steps=5)),
            DuplicateJobError,
            r"adapter 'upper' is already being trained \(0 of 50 updates done\)",
        )


def test_bad_job_dataset_changes_nothing(runtime):
    TRIED["junk dataset records"] += 1
    _unchanged(
        runtime,
        lambda: runtime.add_job(FineTuneJob("other", RECORDS + [{"prompt": "x"}])),
        DatasetError,
        r"record 3: missing or non-string field\(s\) \['completion'\]",
    )


# case -> (submit arguments, error, match)
BAD_RUNTIME_REQUESTS = {
    "unknown adapter": (("ab", "nope"), UnknownAdapterError, "'nope'"),
    "empty text": (("",), InvalidPromptError, "the prompt is empty"),
    "empty ids": (([],), InvalidPromptError, "the prompt is empty"),
    "id = vocab": (([1, 259],), InvalidPromptError, r"\[259\] are outside the vocabulary"),
    "negative id": (([-3],), InvalidPromptError, r"\[-3\] are outside the vocabulary"),
    "too long": (([5] * 32,), PromptTooLongError, "the prompt has 32 tokens; max_seq_len=32"),
    "not sampling params": (("ab", None, "greedy"), InvalidSamplingParamsError, "got str"),
}


def test_bad_runtime_requests(runtime):
    for args, error, match in BAD_RUNTIME_REQUESTS.values():
        TRIED["explicit bad runtime requests"] += 1
        _unchanged(runtime, lambda a=args: runtime.submit(*a), error, match)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(pipeline="sometimes"), "pipeline must be 'no_requests', 'always' or 'never'"),
        (dict(train_rows=0), "train_rows and max_train_seqs must be >= 1"),
        (dict(unified_serve_rows=1), r"unified_serve_rows=1 must be in \[max_seqs"),
    ],
)
def test_bad_runtime_config(fields, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(RUNTIME_CONFIG, **fields)
    TRIED["explicit bad runtime configs"] += 1
