"""Token-budget policy of the unified runtime: serving SLOs first, fine-tuning the rest.

Each runtime step has a budget of tokens. Serving requests are taken earliest deadline
first (a waiting request's deadline is its arrival plus the time-to-first-token target; a
decoding one's, its last token plus the time-per-output-token target), so under overload
the requests closest to missing their SLO go first. Fine-tuning gets every token serving
leaves (token-level fine-tuning, as in FlexLLM), and never less than a guaranteed share
of the budget while it has work: heavy serving load slows training but cannot starve it.

An optional linear step-cost model makes the budget itself SLO-aware: training tokens
above the guaranteed share are cut so that the predicted step time still meets the
tightest deadline among the scheduled requests.

``TokenPolicy.allocate`` is pure: queue state in, token allocation out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SloTargets:
    """Serving latency targets, in seconds."""

    ttft_s: float = 2.0
    tpot_s: float = 0.5

    def __post_init__(self):
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO targets must be positive, got {self}")


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Predicted step time: ``fixed_s + per_token_s * tokens``."""

    fixed_s: float
    per_token_s: float

    def __post_init__(self):
        if self.fixed_s < 0 or self.per_token_s <= 0:
            raise ValueError(f"need fixed_s >= 0 and per_token_s > 0, got {self}")

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens


@dataclasses.dataclass(frozen=True)
class ServeDemand:
    """A serving request that wants a token this step.

    Attributes:
      request_id: the caller's id.
      tokens: what its step costs (its new tokens; the whole prefix when recomputed).
      deadline: absolute time (s) by which its next token is due.
    """

    request_id: int
    tokens: int
    deadline: float


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What one step computes.

    Attributes:
      serve: request ids to serve, in deadline order.
      serve_tokens: their tokens.
      train_tokens: tokens granted to fine-tuning.
    """

    serve: tuple[int, ...]
    serve_tokens: int
    train_tokens: int


@dataclasses.dataclass(frozen=True)
class TokenPolicy:
    """Splits a per-step token budget between serving and fine-tuning.

    Attributes:
      budget: tokens per step, serving and training together.
      serve_capacity: at most this many serving tokens per step (the serving rows).
      max_serve_seqs: at most this many serving requests per step.
      train_capacity: at most this many training tokens per step (the training rows).
      min_train_share: fraction of ``budget`` that fine-tuning keeps under any serving
        load, while it has work.
      cost: optional step-cost model; with it, training above its share is cut to meet
        the tightest scheduled deadline.
    """

    budget: int
    serve_capacity: int
    max_serve_seqs: int
    train_capacity: int
    min_train_share: float = 0.25
    cost: StepCost | None = None

    def __post_init__(self):
        if min(self.budget, self.serve_capacity, self.max_serve_seqs, self.train_capacity) < 1:
            raise ValueError(f"budget and capacities must be positive: {self}")
        if not 0.0 <= self.min_train_share <= 1.0:
            raise ValueError(f"min_train_share must be in [0, 1], got {self.min_train_share}")

    @property
    def min_train_tokens(self) -> int:
        return min(math.ceil(self.min_train_share * self.budget), self.train_capacity)

    def allocate(self, serve: Sequence[ServeDemand], train_demand: int, now: float) -> Allocation:
        """The allocation of one step.

        Args:
          serve: requests wanting a token, in any order.
          train_demand: tokens fine-tuning could use this step (0: no active job).
          now: the current time (s), on the clock of the deadlines.
        """
        reserved = min(self.min_train_tokens, train_demand)
        serve_budget = min(self.serve_capacity, self.budget - reserved)
        chosen, serve_tokens = [], 0
        for demand in sorted(serve, key=lambda d: (d.deadline, d.request_id)):
            if len(chosen) == self.max_serve_seqs:
                break
            if serve_tokens + demand.tokens <= serve_budget:
                chosen.append(demand)
                serve_tokens += demand.tokens
        train = min(train_demand, self.train_capacity, self.budget - serve_tokens)
        if self.cost is not None and chosen:
            slack = min(d.deadline for d in chosen) - now
            affordable = (slack - self.cost.seconds(serve_tokens)) / self.cost.per_token_s
            train = min(train, max(reserved, math.floor(affordable)))
        return Allocation(tuple(d.request_id for d in chosen), serve_tokens, max(train, 0))
