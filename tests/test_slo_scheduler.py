"""The token-budget policy, on synthetic queues (pure, no model)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loqjax.slo_scheduler import ServeDemand, StepCost, TokenPolicy

POLICY = TokenPolicy(
    budget=256, serve_capacity=256, max_serve_seqs=8, train_capacity=256, min_train_share=0.25
)


def test_no_serving_load_gives_training_the_whole_budget():
    allocation = POLICY.allocate([], train_demand=256, now=0.0)
    assert allocation.serve == () and allocation.train_tokens == 256


def test_heavy_serving_keeps_the_training_share():
    queue = [ServeDemand(i, 40, deadline=1.0 + i) for i in range(20)]
    allocation = POLICY.allocate(queue, train_demand=256, now=0.0)
    assert allocation.serve_tokens <= 256 - 64
    assert allocation.train_tokens >= 64
    assert allocation.serve_tokens + allocation.train_tokens <= 256


def test_without_jobs_serving_may_use_the_whole_budget():
    queue = [ServeDemand(i, 32, deadline=1.0) for i in range(8)]
    allocation = POLICY.allocate(queue, train_demand=0, now=0.0)
    assert allocation.serve_tokens == 256 and allocation.train_tokens == 0


def test_earliest_deadline_first():
    queue = [ServeDemand(0, 100, 9.0), ServeDemand(1, 100, 1.0), ServeDemand(2, 100, 5.0)]
    allocation = POLICY.allocate(queue, train_demand=256, now=0.0)
    assert allocation.serve == (1,)  # 192 serving tokens left: one request of 100 fits
    assert POLICY.allocate(queue, train_demand=0, now=0.0).serve == (1, 2)


def test_cost_model_cuts_training_to_meet_the_tightest_deadline():
    policy = TokenPolicy(256, 256, 8, 256, 0.25, cost=StepCost(fixed_s=0.01, per_token_s=0.001))
    queue = [ServeDemand(0, 10, deadline=0.1)]  # 0.09 s of slack after fixed cost
    allocation = policy.allocate(queue, train_demand=256, now=0.0)
    assert allocation.train_tokens == 80  # (0.1 - 0.01 - 0.010) / 0.001
    # An already-late request cannot push training below its share.
    late = policy.allocate([ServeDemand(0, 10, deadline=-1.0)], train_demand=256, now=0.0)
    assert late.train_tokens == 64


def test_rejects_bad_configs():
    with pytest.raises(ValueError):
        TokenPolicy(0, 1, 1, 1)
    with pytest.raises(ValueError):
        TokenPolicy(8, 8, 1, 8, min_train_share=1.5)


@given(
    lengths=st.lists(st.integers(1, 300), max_size=30),
    deadlines=st.lists(st.floats(-5, 5), min_size=30, max_size=30),
    train_demand=st.integers(0, 400),
)
def test_invariants(lengths, deadlines, train_demand):
    queue = [ServeDemand(i, n, d) for i, (n, d) in enumerate(zip(lengths, deadlines, strict=False))]
    allocation = POLICY.allocate(queue, train_demand, now=0.0)
    chosen = {d.request_id: d for d in queue if d.request_id in allocation.serve}
    assert allocation.serve_tokens == sum(d.tokens for d in chosen.values())
    assert allocation.serve_tokens + allocation.train_tokens <= POLICY.budget
    assert len(chosen) <= POLICY.max_serve_seqs
    assert allocation.train_tokens >= min(train_demand, POLICY.min_train_tokens)
    assert allocation.train_tokens <= min(train_demand, POLICY.train_capacity)
    order = [chosen[i].deadline for i in allocation.serve]
    assert order == sorted(order)
    # Greedy in deadline order: a skipped request did not fit, and later picks only
    # filled the serving budget further.
    serve_budget = POLICY.budget - min(POLICY.min_train_tokens, train_demand)
    if len(chosen) < POLICY.max_serve_seqs:
        for demand in queue:
            if demand.request_id not in chosen:
                assert allocation.serve_tokens + demand.tokens > serve_budget
