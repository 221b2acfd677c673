"""Runtime metrics: per adapter and overall serving/training throughput, TTFT/TPOT
percentiles, SLO attainment, and each job's loss curves; kept in memory, optionally
appended to a JSONL log as events happen, and plotted with matplotlib (``plot`` extra).

A request's TPOT is its mean time per output token after the first (as vLLM's benchmarks
define it); the gaps between single tokens are reported as ITL (inter-token latency). A
request meets the SLO when both its TTFT and its TPOT are within the targets.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from loqjax.slo_scheduler import SloTargets

BASE = "<base>"  # the name under which base-model-only requests are reported


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """A finished serving request: seconds to its first token and between later ones."""

    adapter: str
    ttft_s: float
    gaps_s: tuple[float, ...]

    @classmethod
    def of(cls, adapter: str, arrival: float, token_times: tuple[float, ...]) -> RequestRecord:
        """The record of a request that arrived at ``arrival`` and got its tokens at
        ``token_times`` (at least one)."""
        gaps = tuple(b - a for a, b in itertools.pairwise(token_times))
        return cls(adapter, token_times[0] - arrival, gaps)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a single token."""
        return sum(self.gaps_s) / len(self.gaps_s) if self.gaps_s else None

    def meets(self, slo: SloTargets) -> bool:
        tpot = self.tpot_s
        return self.ttft_s <= slo.ttft_s and (tpot is None or tpot <= slo.tpot_s)


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float | None]:
    values = np.asarray(list(values), float)
    return {f"p{q}": float(np.percentile(values, q)) if values.size else None for q in qs}


class Metrics:
    """Accumulates runtime events; ``summary()`` is the report, ``log_path`` the JSONL log."""

    def __init__(self, slo: SloTargets, log_path: str | os.PathLike | None = None):
        self.slo = slo
        self.log_path = None if log_path is None else Path(log_path)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")
        self.start: float | None = None
        self.end: float | None = None
        self.requests: list[RequestRecord] = []
        self.served_tokens: collections.Counter[str] = collections.Counter()
        self.trained_tokens: collections.Counter[str] = collections.Counter()
        self.train_loss: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
        self.eval_loss: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
        self.job_events: list[dict[str, Any]] = []
        self.num_steps = 0
        self.steps_by_kind: collections.Counter[str] = collections.Counter()
        self.seconds_by_kind: collections.Counter[str] = collections.Counter()

    def _log(self, event: str, **fields: Any) -> None:
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps({"event": event, **fields}) + "\n")

    def step(
        self,
        start: float,
        end: float,
        served: dict[str, int],
        trained: dict[str, int],
        kind: str = "serve",
    ) -> None:
        """One runtime step from ``start`` to ``end`` (s): generated tokens and training
        tokens per adapter that it read back (of the step before it, when pipelined), and
        the kind of step its time is charged to ("unified" or "serve": the one it read
        back, whose device time it waited for)."""
        self.start = start if self.start is None else self.start
        self.end = end
        self.num_steps += 1
        self.steps_by_kind[kind] += 1
        self.seconds_by_kind[kind] += end - start
        self.served_tokens.update(served)
        self.trained_tokens.update(trained)
        self._log(
            "step", start=start, seconds=end - start, kind=kind, served=served, trained=trained
        )

    def request(self, record: RequestRecord) -> None:
        self.requests.append(record)
        self._log(
            "request",
            **dataclasses.asdict(record),
            tpot_s=record.tpot_s,
            slo_met=record.meets(self.slo),
        )

    def train(self, job: str, update: int, loss: float) -> None:
        self.train_loss[job].append((update, loss))
        self._log("train", job=job, update=update, loss=loss)

    def eval(self, job: str, update: int, loss: float) -> None:
        self.eval_loss[job].append((update, loss))
        self._log("eval", job=job, update=update, loss=loss)

    def job(
        self,
        job: str,
        status: str,
        update: int,
        reason: str | None = None,
        eval_loss: float | None = None,
    ) -> None:
        """A job's status change at update ``update``: "paused", with why and the held-out
        loss of the weights it keeps, or "running" again."""
        event = dict(job=job, status=status, update=update, reason=reason, eval_loss=eval_loss)
        self.job_events.append(event)
        self._log("job", **event)

    def summary(self) -> dict[str, Any]:
        """{"overall": ..., "adapters": {name: ...}}: tokens/s, latency percentiles (s),
        SLO attainment (share of finished requests meeting both targets); overall also the
        steps and their seconds by the kind they were charged to ("step_kinds")."""
        seconds = max((self.end or 0.0) - (self.start or 0.0), 1e-9)
        names = sorted(
            {*self.served_tokens, *self.trained_tokens, *self.train_loss}
            | {e["job"] for e in self.job_events}
        )

        def report(requests, served, trained, name=None) -> dict[str, Any]:
            out = {
                "serving_tokens_per_s": served / seconds,
                "training_tokens_per_s": trained / seconds,
                "requests": len(requests),
                "ttft_s": percentiles(r.ttft_s for r in requests),
                "tpot_s": percentiles(r.tpot_s for r in requests if r.tpot_s is not None),
                "itl_s": percentiles(t for r in requests for t in r.gaps_s),
                "slo_attainment": (
                    sum(r.meets(self.slo) for r in requests) / len(requests) if requests else None
                ),
            }
            if name in self.train_loss:
                out["train_loss"] = self.train_loss[name]
                out["eval_loss"] = self.eval_loss[name]
            events = [e for e in self.job_events if e["job"] == name]
            if events:
                out["job_events"] = events
            return out

        adapters = {
            name: report(
                [r for r in self.requests if r.adapter == name],
                self.served_tokens[name],
                self.trained_tokens[name],
                name,
            )
            for name in names
        }
        overall = report(
            self.requests, sum(self.served_tokens.values()), sum(self.trained_tokens.values())
        )
        overall.update(
            seconds=seconds,
            steps=self.num_steps,
            step_kinds={
                kind: {"steps": n, "seconds": self.seconds_by_kind[kind]}
                for kind, n in sorted(self.steps_by_kind.items())
            },
        )
        return {"overall": overall, "adapters": adapters}

    def plot(self, path: str | os.PathLike) -> Path | None:
        """Loss curves and latency distributions as an image; None (and a message on
        stdout) when matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed, skipping the plot: pip install 'loqjax[plot]'")
            return None
        fig, (loss_ax, latency_ax) = plt.subplots(1, 2, figsize=(11, 4))
        for job, points in self.train_loss.items():
            loss_ax.plot(*zip(*points, strict=True), label=f"{job} train")
        for job, points in self.eval_loss.items():
            loss_ax.plot(*zip(*points, strict=True), "o--", label=f"{job} eval")
        loss_ax.set(xlabel="update", ylabel="loss", title="fine-tuning loss")
        loss_ax.legend()
        ttft = [r.ttft_s for r in self.requests]
        tpot = [r.tpot_s for r in self.requests if r.tpot_s is not None]
        latency_ax.hist([ttft, tpot], bins=30, label=["TTFT", "TPOT"])
        latency_ax.axvline(self.slo.ttft_s, color="C0", ls=":")
        latency_ax.axvline(self.slo.tpot_s, color="C1", ls=":")
        latency_ax.set(xlabel="seconds", ylabel="count", title="serving latency (SLOs dotted)")
        latency_ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path
