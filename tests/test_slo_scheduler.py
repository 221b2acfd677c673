"""The step policy and SLO deadlines, on synthetic queues (pure, no model)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loqjax.metrics import RequestRecord
from loqjax.slo_scheduler import SloTargets, StepPolicy

SLO = SloTargets(ttft_s=2.0, tpot_s=0.05)
POLICY = StepPolicy(min_train_share=0.25, margin=1.1)


def test_deadlines_keep_the_mean_time_per_token_on_target():
    assert SLO.deadline(arrival=10.0, token_times=[]) == 12.0
    # After k tokens the next is due k TPOTs after the first.
    assert SLO.deadline(10.0, [10.5]) == pytest.approx(10.55)
    assert SLO.deadline(10.0, [10.5, 10.52, 10.54]) == pytest.approx(10.65)


def test_a_token_in_flight_moves_the_deadline_to_the_next():
    # The token a running step samples lands first: the next one is what a step after it
    # must not delay.
    assert SLO.deadline(10.0, [10.5], in_flight=1) == SLO.deadline(10.0, [10.5, 10.51])
    assert SLO.deadline(10.0, [], in_flight=1, now=11.0) == pytest.approx(11.05)
    with pytest.raises(ValueError, match="needs now"):
        SLO.deadline(10.0, [], in_flight=1)


def test_a_run_of_steps_is_due_by_its_last_token():
    # Two more tokens after the next: two TPOTs later; a first token: its TTFT deadline.
    assert SLO.deadline(10.0, [10.5], later=2) == pytest.approx(10.65)
    assert SLO.deadline(10.0, [10.5], in_flight=1, later=1) == SLO.deadline(10.0, [10.5], later=2)
    assert SLO.deadline(10.0, [], later=3) == SLO.deadline(10.0, []) == 12.0
    assert SLO.deadline(10.0, [], in_flight=1, now=11.0, later=1) == pytest.approx(11.1)


@given(
    arrival=st.floats(0, 10),
    fractions=st.lists(st.floats(0, 1), min_size=1, max_size=20),
)
def test_meeting_every_deadline_meets_the_slo(arrival, fractions):
    """A request whose every token comes by its deadline (each at a drawn fraction of the
    way from the previous token to it) meets both targets as the metrics measure them."""
    times = []
    for fraction in fractions:
        previous = times[-1] if times else arrival
        times.append(previous + fraction * (SLO.deadline(arrival, times) - previous))
    record = RequestRecord.of("a", arrival, tuple(times))
    assert record.meets(SloTargets(SLO.ttft_s + 1e-9, SLO.tpot_s + 1e-9))


def test_trains_when_every_deadline_allows():
    assert POLICY.train_now([1.0, 2.0], now=0.0, predicted_s=0.5, train_share=0.5)
    # 0.5 s * 1.1 would end after the first deadline.
    assert not POLICY.train_now([0.54, 2.0], now=0.0, predicted_s=0.5, train_share=0.5)


def test_without_requests_or_a_measurement_it_trains():
    assert POLICY.train_now([], now=0.0, predicted_s=10.0, train_share=1.0)
    assert POLICY.train_now([0.0], now=5.0, predicted_s=None, train_share=1.0)


def test_the_guaranteed_share_overrides_deadlines():
    late = [-1.0]
    assert not POLICY.train_now(late, now=0.0, predicted_s=0.1, train_share=0.3)
    assert POLICY.train_now(late, now=0.0, predicted_s=0.1, train_share=0.2)
    assert not StepPolicy(min_train_share=0.0).train_now(late, 0.0, 0.1, train_share=0.0)


def test_rejects_bad_configs():
    with pytest.raises(ValueError):
        StepPolicy(min_train_share=1.5)
    with pytest.raises(ValueError):
        StepPolicy(margin=0.5)
    with pytest.raises(ValueError):
        SloTargets(ttft_s=0.0)


@given(
    deadlines=st.lists(st.floats(-5, 5), max_size=30),
    now=st.floats(-1, 1),
    predicted=st.floats(0.001, 3),
    share=st.floats(0, 1),
)
def test_invariants(deadlines, now, predicted, share):
    decision = POLICY.train_now(deadlines, now, predicted, share)
    if share < POLICY.min_train_share:
        assert decision
    else:
        assert decision == all(now + POLICY.margin * predicted <= d for d in deadlines)
