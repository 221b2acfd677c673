"""The continuous-batching scheduler, simulated on the host: limits hold every step, pages
are accounted for, preempted sequences come back first, and every request finishes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loqjax.sampling import SamplingParams
from loqjax.scheduler import EngineConfig, Scheduler, SequenceState


def _seq(request_id: int, prompt_len: int) -> SequenceState:
    return SequenceState(request_id, [0] * prompt_len, prompt_len, None, SamplingParams(), seed=0)


def _run_step(scheduler: Scheduler, targets: dict[int, int]) -> list:
    """Schedules and 'runs' one step: computed chunks advance, sequences whose last known
    token was computed get a token, and those with ``targets[id]`` tokens finish."""
    config, pool = scheduler.config, scheduler.pool
    chunks = scheduler.schedule()
    assert sum(c.length for c in chunks) <= config.token_capacity
    assert len({id(c.seq) for c in chunks}) == len(chunks) <= config.max_seqs
    assert all(c.seq in scheduler.running for c in chunks)
    held = [p for s in scheduler.running for p in s.pages]
    assert len(set(held)) == len(held) == pool.num_pages - pool.num_free
    assert not any(s.pages for s in scheduler.waiting)
    for chunk in chunks:
        seq = chunk.seq
        assert chunk.start == seq.num_computed and 0 < chunk.length
        assert chunk.stop <= len(seq.token_ids) < config.max_seq_len
        assert pool.pages_for(chunk.stop) <= len(seq.pages) <= config.pages_per_seq
        seq.num_computed = chunk.stop
        if chunk.stop == len(seq.token_ids):
            seq.token_ids.append(1)
            if seq.num_generated == targets[seq.request_id]:
                scheduler.remove(seq)
    return chunks


@st.composite
def workloads(draw):
    page_size = draw(st.integers(1, 8))
    max_seq_len = draw(st.integers(2, 48))
    pages_per_seq = -(-max_seq_len // page_size)
    token_capacity = draw(st.integers(1, 24))
    config = EngineConfig(
        token_capacity=token_capacity,
        max_seqs=draw(st.integers(1, min(token_capacity, 6))),
        page_size=page_size,
        num_pages=draw(st.integers(pages_per_seq, 3 * pages_per_seq)),
        max_seq_len=max_seq_len,
    )
    requests = draw(
        st.lists(
            st.tuples(st.integers(1, max_seq_len - 1), st.integers(0, 5)),  # (prompt, arrival)
            min_size=1,
            max_size=12,
        )
    )
    generated = [draw(st.integers(1, max_seq_len - p)) for p, _ in requests]
    return config, requests, generated


@settings(max_examples=150, deadline=None)
@given(workload=workloads())
def test_every_request_finishes_within_the_limits(workload):
    config, requests, generated = workload
    scheduler = Scheduler(config)
    targets = dict(enumerate(generated))
    for step in range(10_000):
        for i, (prompt_len, arrival) in enumerate(requests):
            if arrival == step:
                scheduler.add(_seq(i, prompt_len))
        if not scheduler.has_work and step > 5:
            break
        chunks = _run_step(scheduler, targets)
        assert chunks or not scheduler.has_work
    else:
        pytest.fail("the requests did not finish")
    assert scheduler.pool.num_free == config.num_pages


def test_newest_is_preempted_and_comes_back_first():
    # Three pages: one sequence of 12 tokens fills the pool.
    config = EngineConfig(token_capacity=8, max_seqs=4, page_size=4, num_pages=3, max_seq_len=12)
    scheduler = Scheduler(config)
    old, new, later = _seq(0, 3), _seq(1, 3), _seq(2, 5)  # later needs 2 pages
    scheduler.add(old)
    scheduler.add(new)
    targets = {0: 8, 1: 8, 2: 1}
    chunks = _run_step(scheduler, targets)
    assert [(c.seq, c.start, c.stop) for c in chunks] == [(old, 0, 3), (new, 0, 3)]
    scheduler.add(later)
    while new in scheduler.running:
        _run_step(scheduler, targets)
    # `new` gave its pages to `old` and waits ahead of `later`, all computed work gone.
    assert scheduler.num_preemptions == 1
    assert list(scheduler.waiting) == [new, later]
    assert (new.pages, new.num_computed) == ([], 0)
    assert new.num_generated > 0 and old in scheduler.running
    while scheduler.has_work:
        _run_step(scheduler, targets)
    assert (old.num_generated, new.num_generated, later.num_generated) == (8, 8, 1)
    assert scheduler.pool.num_free == 3


def test_long_prompts_are_chunked_and_decodes_keep_a_token():
    config = EngineConfig(token_capacity=8, max_seqs=2, page_size=4, num_pages=16, max_seq_len=32)
    scheduler = Scheduler(config)
    first, long = _seq(0, 2), _seq(1, 20)
    scheduler.add(first)
    scheduler.add(long)
    targets = {0: 5, 1: 1}
    lengths = [[(c.seq.request_id, c.length) for c in _run_step(scheduler, targets)]]
    while scheduler.has_work:
        lengths.append([(c.seq.request_id, c.length) for c in _run_step(scheduler, targets)])
    assert lengths[:4] == [[(0, 2), (1, 6)], [(0, 1), (1, 7)], [(0, 1), (1, 7)], [(0, 1)]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(token_capacity=0), "token_capacity must be a positive integer"),
        (dict(max_seqs=9, token_capacity=8), "max_seqs=9 exceeds token_capacity=8"),
        (dict(num_pages=3, page_size=4, max_seq_len=13), "cannot hold one sequence"),
    ],
)
def test_invalid_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)
