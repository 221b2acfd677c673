"""The serving engine end to end: greedy generations equal transformers' and PEFT's, a
request gets the same tokens alone, in a mixed batch or preempted, stop conditions,
streaming, cancellation, adapters changing under the engine, and submit-time errors."""

import dataclasses
import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from loqjax import (
    AdapterRegistry,
    Engine,
    EngineConfig,
    InvalidPromptError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    SamplingParams,
    UnknownAdapterError,
    add_lora_tables,
    load_model,
    load_peft_adapter,
)
from loqjax.tokenization import load_tokenizer

from hf_reference import LORA_MAX_RANK, LORA_NUM_SLOTS, PEFT_ADAPTERS

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "default"

# Every engine shares these shapes, so engines over models of one architecture share a
# compiled step; 45-token prompts take two steps to prefill.
CONFIG = EngineConfig(token_capacity=32, max_seqs=8, page_size=4, num_pages=128, max_seq_len=64)
# 16 pages hold one 64-token sequence: a dozen long requests must take turns.
TINY_POOL = dataclasses.replace(CONFIG, num_pages=20)
ARCHS = ("llama2", "qwen2")
ADAPTERS = (None, *PEFT_ADAPTERS)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def _eos_ids(torch_model) -> tuple[int, ...]:
    eos = torch_model.generation_config.eos_token_id
    return () if eos is None else (eos,)


def _hf_generate(
    torch_model, prompt: list[int], max_new_tokens: int, repetition_penalty: float = 1.0
) -> list[int]:
    """Greedy continuation by ``generate`` (stopping after the model's EOS id)."""
    with torch.no_grad():
        out = torch_model.generate(
            torch.as_tensor([prompt]),
            # Explicit: generate would mask prompt tokens that equal the pad id.
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def engines(lora_models, hf_models) -> dict[str, Engine]:
    """arch -> engine over the conftest LoRA model (every PEFT adapter loaded)."""
    return {
        arch: Engine(*lora_models[arch], config=CONFIG, eos_token_ids=_eos_ids(hf.torch_model))
        for arch, hf in hf_models.items()
        if arch in ARCHS
    }


@pytest.fixture(scope="module")
def text_engine() -> Engine:
    """The embedded default model with its byte-level tokenizer (EOS id 2)."""
    return Engine.from_pretrained(DEFAULT_MODEL, CONFIG)


def _run_alone(engine: Engine, prompt, adapter, params):
    assert engine.num_unfinished == 0
    return engine.submit(prompt, adapter, params).result()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_and_peft(arch, engines, hf_models, peft_adapters):
    engine = engines[arch]
    prompts = _prompts(hf_models[arch].vocab_size, (3, 17, 45))
    handles = {
        (name, i): engine.submit(prompt, name, GREEDY)
        for name in ADAPTERS
        for i, prompt in enumerate(prompts)
    }
    engine.run_until_idle()
    outputs = {key: list(handle.result().token_ids) for key, handle in handles.items()}
    for (name, i), tokens in outputs.items():
        torch_model = (hf_models[arch] if name is None else peft_adapters[arch][name]).torch_model
        assert tokens == _hf_generate(torch_model, prompts[i], GREEDY.max_tokens), (name, i)
    for name in PEFT_ADAPTERS:  # the adapters matter
        assert any(outputs[name, i] != outputs[None, i] for i in range(len(prompts))), name
    assert engine.num_free_pages == CONFIG.num_pages


def test_repetition_penalty_sees_the_tokens_of_the_step_in_flight(engines, hf_models):
    """Steps are pipelined: each decode token reaches the next step's penalized ids on the
    device (``PendingTokens``), so penalized greedy decoding matches transformers'."""
    engine, hf = engines["llama2"], hf_models["llama2"]
    prompts = _prompts(hf.vocab_size, (3, 9, 20), seed=4)
    penalized = dataclasses.replace(GREEDY, max_tokens=16, repetition_penalty=2.0)
    handles = [engine.submit(prompt, None, penalized) for prompt in prompts]
    plain = [
        engine.submit(prompt, None, dataclasses.replace(penalized, repetition_penalty=1.0))
        for prompt in prompts
    ]
    engine.run_until_idle()
    outputs = [
        (h.result().token_ids, p.result().token_ids) for h, p in zip(handles, plain, strict=True)
    ]
    for prompt, (tokens, _) in zip(prompts, outputs, strict=True):
        assert list(tokens) == _hf_generate(hf.torch_model, prompt, 16, repetition_penalty=2.0)
    assert any(tokens != unpenalized for tokens, unpenalized in outputs)  # the penalty matters


def _mixed_requests(vocab_size: int, n: int, seed: int):
    """n requests of every adapter, prompt length and sampling mode, all seeded."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        prompt = rng.integers(0, vocab_size, rng.integers(1, 46)).tolist()
        mode = dict(
            temperature=[0.0, 0.8, 1.0, 1.2, 0.0][i % 5],
            top_k=[0, 0, 5, 0, 0][i % 5],
            top_p=[1.0, 1.0, 1.0, 0.7, 1.0][i % 5],
            repetition_penalty=[1.0, 1.0, 1.0, 1.0, 1.5][i % 5],
        )
        params = SamplingParams(
            **mode,
            seed=int(rng.integers(2**32)),
            max_tokens=int(rng.integers(1, 17)),
            stop_token_ids=[int(rng.integers(vocab_size))] if i % 3 == 0 else [],
        )
        requests.append((prompt, ADAPTERS[rng.integers(len(ADAPTERS))], params))
    return requests


def test_mixed_batch_equals_each_request_alone(engines, hf_models):
    engine = engines["qwen2"]
    requests = _mixed_requests(hf_models["qwen2"].vocab_size, 50, seed=1)
    engine.warmup(sampling=[params for *_, params in requests])  # every mix of the modes
    step = engine._serve_step
    compiled = step._cache_size()
    handles = [engine.submit(*request) for request in requests]
    start = engine.stats.steps
    engine.run_until_idle()
    batched_steps = engine.stats.steps - start
    assert step._cache_size() == compiled, "a step recompiled"
    assert engine.num_free_pages == CONFIG.num_pages
    for request, handle in zip(requests, handles, strict=True):
        out, alone = handle.result(), _run_alone(engine, *request)
        assert (out.token_ids, out.finish_reason) == (alone.token_ids, alone.finish_reason)
        assert out.finish_reason in ("stop", "length")
    assert batched_steps < (engine.stats.steps - start - batched_steps) / 4


def test_preemption_under_a_tiny_pool_loses_nothing(engines, lora_models, hf_models):
    reference = engines["llama2"]
    engine = Engine(
        *lora_models["llama2"],
        config=TINY_POOL,
        eos_token_ids=_eos_ids(hf_models["llama2"].torch_model),
    )
    rng = np.random.default_rng(2)
    requests = [
        (
            prompt,
            ADAPTERS[i % len(ADAPTERS)],
            SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=18),
        )
        for i, prompt in enumerate(
            _prompts(hf_models["llama2"].vocab_size, rng.integers(20, 40, 12), seed=3)
        )
    ]
    handles = [engine.submit(*request) for request in requests]
    engine.run_until_idle()
    assert engine.stats.preemptions > 0
    assert engine.num_free_pages == TINY_POOL.num_pages
    for request, handle in zip(requests, handles, strict=True):
        out, alone = handle.result(), _run_alone(reference, *request)
        assert (out.token_ids, out.finish_reason) == (alone.token_ids, alone.finish_reason)


def test_seeded_sampling_is_reproducible(engines, hf_models):
    engine = engines["llama2"]
    prompt = _prompts(hf_models["llama2"].vocab_size, [9])[0]

    def tokens(seed, **kwargs):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=12, **kwargs)
        return _run_alone(engine, prompt, "qv", params).token_ids

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)
    assert tokens(7) != tokens(7, top_k=3)


# --- text, stop conditions and streaming, on the default model ----------------------

SEEDED = SamplingParams(temperature=1.0, seed=11, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference_run(text_engine):
    """The unstopped seeded generation the stop tests cut short."""
    return _run_alone(text_engine, "Once upon a time", None, SEEDED)


def test_text_streams_as_it_is_produced(text_engine, reference_run):
    handle = text_engine.submit("Once upon a time", sampling=SEEDED)
    events = iter(handle)
    first = next(events)
    assert not handle.done and len(handle.output().token_ids) == 1
    events = [first, *events]
    out = handle.result()
    assert out == dataclasses.replace(reference_run, request_id=out.request_id)
    assert [e.token_id for e in events] == list(out.token_ids)
    assert "".join(e.text for e in events) == out.text
    assert out.text == text_engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.prompt_token_ids == tuple(text_engine.tokenizer("Once upon a time")["input_ids"])


def test_max_tokens_and_the_context_limit(text_engine):
    out = _run_alone(text_engine, "Hi", None, dataclasses.replace(SEEDED, max_tokens=5))
    assert (len(out.token_ids), out.finish_reason) == (5, "length")
    long_prompt = list(range(3, 3 + CONFIG.max_seq_len - 4))
    out = _run_alone(text_engine, long_prompt, None, SEEDED)
    assert (len(out.token_ids), out.finish_reason) == (4, "length")


def test_stop_token_ids_and_eos(text_engine, reference_run):
    ref = reference_run.token_ids
    stop_id = ref[6]
    k = ref.index(stop_id)
    params = dataclasses.replace(SEEDED, stop_token_ids=[stop_id])
    out = _run_alone(text_engine, "Once upon a time", None, params)
    assert (out.token_ids, out.finish_reason) == (ref[: k + 1], "stop")
    assert out.text == text_engine.tokenizer.decode(ref[:k], skip_special_tokens=True)

    # The same id as the engine's end of sequence, ignored or not.
    eos_engine = Engine.from_pretrained(DEFAULT_MODEL, CONFIG, eos_token_ids=[stop_id])
    out = _run_alone(eos_engine, "Once upon a time", None, SEEDED)
    assert out.token_ids == reference_run.token_ids
    out = _run_alone(
        eos_engine, "Once upon a time", None, dataclasses.replace(SEEDED, ignore_eos=False)
    )
    assert (out.token_ids, out.finish_reason) == (ref[: k + 1], "stop")


def test_stop_strings(text_engine, reference_run):
    text = reference_run.text
    stop = text[7:9]
    cut = text.index(stop)
    handle = text_engine.submit(
        "Once upon a time", sampling=dataclasses.replace(SEEDED, stop=["\x00never", stop])
    )
    events = list(handle)
    out = handle.result()
    assert (out.text, out.finish_reason) == (text[:cut], "stop")
    assert "".join(e.text for e in events) == out.text
    assert out.token_ids == reference_run.token_ids[: len(out.token_ids)]
    decoded = text_engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert decoded.startswith(text[:cut] + stop)
    assert len(out.token_ids) < len(reference_run.token_ids)


def test_chat_prompts_use_the_chat_template():
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    _, model = load_model(DEFAULT_MODEL)
    engine = Engine(model, tokenizer=tokenizer, config=CONFIG)
    messages = [{"role": "user", "content": "Hello!"}]
    out = engine.submit(messages, sampling=dataclasses.replace(SEEDED, max_tokens=3)).result()
    assert list(out.prompt_token_ids) == tokenizer("<user>Hello!\n<assistant>")["input_ids"][1:]
    assert len(out.token_ids) == 3


def test_the_model_is_out_of_the_garbage_collectors_reach(text_engine):
    """A full collection scanning the model's objects stalled a decode step (0.34 s for
    the 8B shape): the engine freezes what is alive once built and once warm."""
    tracked = {id(o) for o in gc.get_objects()}  # frozen objects are not tracked
    assert id(text_engine) not in tracked
    assert not any(id(v) in tracked for v in text_engine._variables)


def test_variables_with_value_hooks_are_refused():
    """The engine serves its variables' stored arrays (``_serving_leaves``): a variable
    whose read value differs from what it stores is refused, not served stale."""
    _, model = load_model(DEFAULT_MODEL)
    model.norm.scale = nnx.Param(model.norm.scale[...], on_get_value=lambda _, x: 2 * x)
    with pytest.raises(ValueError, match="Param variable .* has a value hook or an array ref"):
        Engine(model, config=CONFIG)


# --- cancellation and adapters changing under the engine ----------------------------


def test_cancellation_frees_pages(engines, hf_models):
    engine = engines["llama2"]
    long, short = _prompts(hf_models["llama2"].vocab_size, (30, 10))
    params = dataclasses.replace(GREEDY, max_tokens=20)
    cancelled, kept = engine.submit(long, "all_rs", params), engine.submit(short, "all_rs", params)
    for _ in range(3):
        engine.step()
    queued = engine.submit(short, None, params)  # not scheduled yet
    free = engine.num_free_pages
    queued.cancel()
    assert engine.num_free_pages == free
    cancelled.cancel()
    # Three steps dispatched (prefill, two decodes; see Engine.step): its 30 prompt tokens
    # and its first 2 generated tokens were cached, and the 2 read back are its output.
    assert engine.num_free_pages == free + 32 // CONFIG.page_size
    assert cancelled.result().finish_reason == queued.result().finish_reason == "cancelled"
    assert len(list(cancelled)) == 2 and list(queued) == []
    engine.run_until_idle()
    cancelled.cancel()  # done: a no-op
    assert engine.num_free_pages == CONFIG.num_pages
    assert kept.result().token_ids == _run_alone(engine, short, "all_rs", params).token_ids


def test_adapters_loaded_and_unloaded_while_serving(hf_models, peft_adapters, engines):
    """The engine sees registry changes without re-splitting; a request whose adapter is
    unloaded mid-generation is aborted alone."""
    _, model = load_model(hf_models["llama2"].path)
    add_lora_tables(model, num_slots=LORA_NUM_SLOTS, max_rank=LORA_MAX_RANK)
    registry = AdapterRegistry(model)
    engine = Engine(model, registry, config=CONFIG, eos_token_ids=(2,))
    prompt = _prompts(hf_models["llama2"].vocab_size, [12])[0]
    with pytest.raises(UnknownAdapterError, match="no adapter named 'late'"):
        engine.submit(prompt, "late", GREEDY)

    registry.load("late", load_peft_adapter(peft_adapters["llama2"]["kou"].path))
    expected = _hf_generate(peft_adapters["llama2"]["kou"].torch_model, prompt, 12)
    assert list(engine.submit(prompt, "late", GREEDY).result().token_ids) == expected

    doomed = engine.submit(prompt, "late", GREEDY)
    survivor = engine.submit(prompt, None, GREEDY)
    engine.step()
    registry.unload("late")
    engine.run_until_idle()
    assert doomed.result().finish_reason == "aborted"
    assert survivor.result() == dataclasses.replace(
        _run_alone(engines["llama2"], prompt, None, GREEDY), request_id=survivor.request_id
    )
    assert engine.num_free_pages == CONFIG.num_pages


# --- submit-time errors ---------------------------------------------------------------

TOO_LONG = list(range(CONFIG.max_seq_len))

# case -> (engine fixture, prompt, adapter, sampling, error, match)
BAD_REQUESTS = {
    "unknown adapter": ("ids", [5], "nope", None, UnknownAdapterError, "no adapter named 'nope'"),
    "adapter without registry": (
        "text",
        "Hi",
        "qv",
        None,
        UnknownAdapterError,
        "the engine serves no adapters",
    ),
    "empty text": ("text", "", None, None, InvalidPromptError, "the prompt is empty"),
    "empty ids": ("ids", [], None, None, InvalidPromptError, "the prompt is empty"),
    "empty array": ("ids", np.zeros(0, int), None, None, InvalidPromptError, "is empty"),
    "id too large": ("ids", [3, 101], None, None, InvalidPromptError, r"\[101\] are outside"),
    "negative id": ("ids", [-1, 4], None, None, InvalidPromptError, r"\[-1\] are outside"),
    "float ids": ("ids", [1.0, 2.0], None, None, InvalidPromptError, "only token ids"),
    "2-d ids": ("ids", np.ones((2, 2), int), None, None, InvalidPromptError, "must be 1-D"),
    "not a prompt": ("ids", 17, None, None, InvalidPromptError, "got int"),
    "text without tokenizer": ("ids", "Hi", None, None, InvalidPromptError, "needs a tokenizer"),
    "chat without template": (
        "text",
        [{"role": "user", "content": "Hi"}],
        None,
        None,
        InvalidPromptError,
        "no chat template",
    ),
    "too long": ("ids", TOO_LONG, None, None, PromptTooLongError, "has 64 tokens"),
    "sampling not params": (
        "ids",
        [5],
        None,
        {"temperature": 0},
        InvalidSamplingParamsError,
        "must be SamplingParams",
    ),
    "stop id too large": (
        "ids",
        [5],
        None,
        SamplingParams(stop_token_ids=[101]),
        InvalidSamplingParamsError,
        r"stop_token_ids \[101\] are outside",
    ),
    "stop string without tokenizer": (
        "ids",
        [5],
        None,
        SamplingParams(stop=["."]),
        InvalidSamplingParamsError,
        "stop strings need a tokenizer",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_are_rejected_at_submit(case, engines, text_engine):
    which, prompt, adapter, sampling, error, match = BAD_REQUESTS[case]
    engine = engines["llama2"] if which == "ids" else text_engine
    good = engine.submit([4, 5, 6], None, GREEDY)
    with pytest.raises(error, match=match):
        engine.submit(prompt, adapter, sampling)
    assert engine.num_unfinished == 1
    out = good.result()
    assert out.token_ids == _run_alone(engine, [4, 5, 6], None, GREEDY).token_ids
