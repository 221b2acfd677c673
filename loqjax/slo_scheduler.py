"""The runtime's step policy: serving SLOs first, fine-tuning in the time they leave.

Every runtime step serves all running requests (continuous batching over the paged KV
cache); the policy only decides whether the step also carries a fine-tuning batch. A
training step takes much longer than a decode-only one (an 8B model: ~70 ms for 1024
training tokens against ~5 ms for a decode step), so it may run only when every request in
the step can afford the wait:

* a request waiting for its first token is due at ``arrival + ttft_s``;
* a request with k >= 1 tokens is due at ``first_token + k * tpot_s``: if its next token
  comes by then, its mean time per output token (the TPOT of the SLO) stays on target;
* a token that a step still running on the device samples (steps are pipelined) lands
  before any later step's: the deadline that counts is the next one's.

Fast decode steps bank slack against those deadlines, and a training step spends it.
With a step-time prediction for the training step (measured by the runtime), the policy
trains when no scheduled deadline would be missed, and always while fine-tuning has had
less than ``min_train_share`` of the step time: heavy serving load slows training but
cannot starve it. The runtime may ask for a run of training steps at once (each serves
every request a token too): the deadlines are then those of the run's last tokens
(``SloTargets.deadline(..., later=)``) and the prediction the whole run's.

``StepPolicy.train_now`` is pure: queue state in, decision out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SloTargets:
    """Serving latency targets, in seconds: time to first token, and mean time per output
    token after it."""

    ttft_s: float = 2.0
    tpot_s: float = 0.5

    def __post_init__(self):
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO targets must be positive, got {self}")

    def deadline(
        self,
        arrival: float,
        token_times: Sequence[float],
        in_flight: int = 0,
        now: float | None = None,
        later: int = 0,
    ) -> float:
        """When a request's next token is due (see the module docstring), after the
        ``in_flight`` tokens a step still running on the device samples for it: those land
        before any later step's, so the deadline is that of the token after them. A first
        token in flight lands at about ``now`` (required then).

        ``later`` > 0: the deadline of the token that many after the next, the last of a
        run of steps that each sample one. A request still waiting for its first token
        is due at ``arrival + ttft_s`` whatever ``later``: the whole run must end by then.
        """
        if not token_times and not in_flight:
            return arrival + self.ttft_s
        first = token_times[0] if token_times else now
        if first is None:
            raise ValueError("a request whose first token is in flight needs now")
        return first + (len(token_times) + in_flight + later) * self.tpot_s


@dataclasses.dataclass(frozen=True)
class StepPolicy:
    """Whether a step carries fine-tuning rows.

    Attributes:
      min_train_share: the share of step time fine-tuning gets, at least, while it has
        work, whatever the serving load (0 lets serving always win, 1 always trains).
      margin: factor on the predicted training-step time, against misprediction.
    """

    min_train_share: float = 0.25
    margin: float = 1.1

    def __post_init__(self):
        if not 0.0 <= self.min_train_share <= 1.0:
            raise ValueError(f"min_train_share must be in [0, 1], got {self.min_train_share}")
        if self.margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {self.margin}")

    def train_now(
        self,
        deadlines: Sequence[float],
        now: float,
        predicted_s: float | None,
        train_share: float,
    ) -> bool:
        """The decision for one step, given fine-tuning has work.

        Args:
          deadlines: absolute times (s) the step's serving requests are due.
          now: the current time, on the deadlines' clock.
          predicted_s: the predicted duration of a training step; None before any was
            measured (then it trains, and so gets measured).
          train_share: the share of step time fine-tuning has had so far.
        """
        if train_share < self.min_train_share or predicted_s is None:
            return True
        done = now + self.margin * predicted_s
        return all(done <= deadline for deadline in deadlines)
