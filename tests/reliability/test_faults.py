"""Faults under serving traffic: fine-tuning jobs that go non-finite are paused with their
last good weights while the rest trains and serves on; a burst beyond the KV page pool
preempts and still completes every request; cancelled requests free their pages.

Every runtime here is ``make_runtime()`` (one compiled step for all); every served request
is compared with the same request run alone (greedy, float32), and the page pool is
checked after every step. A process killed during a checkpoint save is
tests/test_checkpointing.py::test_a_save_killed_mid_write_leaves_the_previous_step.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loqjax import DuplicateJobError, FineTuneJob, LoraConfig, Runtime
from loqjax.unified import TrainState

from _reliability import (
    RUNTIME_CONFIG,
    TRIED,
    check_pages,
    make_runtime,
    pool_request,
    records,
    same_bits,
    same_output,
    slot_bits,
)

_rng = np.random.default_rng(5)
_WORDS = ["".join(_rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 14)) for _ in range(12)]
# 41-token examples: two never fit the 64 training rows, so every step gives it one
# example at most, and with batch_tokens=1 each example is one update. Its updates are
# then the same examples, in the same order, whatever else trains beside it.
HEALTHY = FineTuneJob(
    "healthy",
    [{"prompt": f"upper: {w} =>", "completion": f" {w.upper()}\n"} for w in _WORDS],
    LoraConfig(rank=4, alpha=8.0, seed=1),
    hyperparams={"learning_rate": 3e-3},
    steps=8,
    batch_tokens=1,
    eval_every=4,
)
# A learning rate of 1e30: the first update is finite (B ~ 1e30), the next forward is not.
BLOWUP = FineTuneJob(
    "blowup",
    records("add", 40),
    LoraConfig(rank=4, alpha=8.0, seed=2),
    hyperparams={"learning_rate": 1e30},
    steps=4,
    batch_tokens=1,
)
# A sane job whose optimizer state gets corrupted (NaN second moments) after update 2.
CORRUPT = FineTuneJob(
    "corrupt",
    records("upper", 40),
    LoraConfig(rank=4, alpha=8.0, seed=3),
    hyperparams={"learning_rate": 3e-3},
    steps=6,
    batch_tokens=1,
    eval_every=2,
)
NOT_FINITE = r"(the training loss was (nan|inf|-inf)|its gradient, or the update, was not finite)"


class Traffic:
    """Pool requests submitted between steps while fewer than ``in_flight`` are
    unfinished (``submit``), plus any added with ``add``; ``check`` compares every one
    with its run alone."""

    def __init__(self, runtime: Runtime, alone, seed: int, in_flight: int):
        self.runtime, self.alone, self.in_flight = runtime, alone, in_flight
        self.rng = np.random.default_rng(seed)
        self.sent: list[tuple] = []  # (handle, request, weights for Alone or None)

    def submit(self) -> None:
        while self.runtime.num_unfinished < self.in_flight:
            self.add(pool_request(self.rng))

    def add(self, request: tuple, weights: tuple | None = None):
        handle = self.runtime.submit(*request)
        self.sent.append((handle, request, weights))
        return handle

    def check(self) -> int:
        """Asserts every request finished as it does alone; returns how many there were."""
        for handle, request, weights in self.sent:
            assert handle.done
            assert same_output(handle.result(), self.alone(*request, weights=weights)), request
        return len(self.sent)


def run_until(runtime: Runtime, done, traffic: Traffic | None, kept: dict, max_steps=400):
    """Steps (traffic submitted before each) until ``done()``; checks the page pool after
    every step and keeps each job's weights (``slot_bits``) after each of its updates,
    in ``kept[name][update]``. Each step is landed at once, so that what the test reads
    and writes between steps (updates, weights, poisoned moments) is that step's; the
    pipelined runtime is test_a_pause_pipelined_equals_one_landed_step_by_step's."""
    for _ in range(max_steps):
        if done():
            return
        if traffic is not None:
            traffic.submit()
        before = {name: run.updates for name, run in runtime.jobs.items()}
        assert runtime.step()
        runtime.land()
        check_pages(runtime)
        for name, run in runtime.jobs.items():
            if run.updates != before[name]:
                kept.setdefault(name, {})[run.updates] = slot_bits(runtime, run.slot)
    raise AssertionError(f"not done after {max_steps} steps")


def poison_moments(runtime: Runtime, slot: int) -> None:
    """Writes NaN into ``slot``'s Adam second moments (a corrupted optimizer state)."""
    opt = runtime._state.opt
    poisoned = []

    def poison(path, leaf):
        if any(getattr(key, "name", None) == "nu" for key in path):
            poisoned.append(path)
            return leaf.at[slot].set(jnp.nan)
        return leaf

    inner = jax.tree_util.tree_map_with_path(poison, opt.inner)
    assert poisoned
    runtime._state = TrainState(runtime._state.params, opt._replace(inner=inner))


def events(runtime: Runtime, name: str) -> list[tuple[str, int]]:
    return [(e["status"], e["update"]) for e in runtime.metrics.job_events if e["job"] == name]


def test_non_finite_jobs_are_paused_and_the_rest_goes_on(alone):
    """Three jobs under serving traffic: one diverges (learning rate 1e30), one gets NaN
    optimizer moments after update 2, one is healthy.

    Each faulty job is paused at its first non-finite step with a failure message and a
    metrics event, its weights bit-identical to those after its last accepted update;
    ``resume_job`` goes on (and pauses again while the cause remains: the corrupted
    moments, kept without ``reset_optimizer``; the diverged weights themselves, until
    ``replace_adapter`` gives them earlier ones). The healthy job's weights and losses equal
    a run of it alone to rounding (1e-6: where its rows sit in the batch, and how many rows
    the batch has, change the summation order), and every served request equals its run
    alone, requests to the paused adapters included (the diverged one's, NaN logits,
    beside the others)."""
    runtime = make_runtime()
    runs = {job.name: runtime.add_job(job) for job in (HEALTHY, BLOWUP, CORRUPT)}
    healthy, blowup, corrupt = runs.values()
    kept = {name: {0: slot_bits(runtime, run.slot)} for name, run in runs.items()}
    runtime.sync_model()
    initial = {name: runtime.registry.export(name) for name in runs}
    with pytest.raises(ValueError, match="'healthy' is being trained by a running job"):
        runtime.replace_adapter("healthy", initial["healthy"])
    TRIED["bad resume_job / replace_adapter / unload_adapter calls"] += 1
    traffic = Traffic(runtime, alone, seed=1, in_flight=6)

    poisoned = []

    def poison_after_update_2():
        if corrupt.updates == 2 and not poisoned:
            poison_moments(runtime, corrupt.slot)
            poisoned.append(corrupt.updates)
        return healthy.done and blowup.paused and corrupt.paused

    run_until(runtime, poison_after_update_2, traffic, kept)
    TRIED["fault: a job diverging (learning rate 1e30)"] += 1
    TRIED["fault: NaN optimizer moments of a job"] += len(poisoned)

    assert (blowup.status, blowup.updates) == ("paused", 1)
    assert re.fullmatch(
        rf"update 2: {NOT_FINITE}; paused, the weights of update 1 kept "
        r"\(held-out loss (nan|inf)\)",
        blowup.failure,
    )
    assert same_bits(slot_bits(runtime, blowup.slot), kept["blowup"][1])
    assert all(np.isfinite(x.view(np.float32)).all() for x in kept["blowup"][1])

    good = corrupt.eval_loss[-1]
    assert good[0] == 2 and (corrupt.status, corrupt.updates) == ("paused", 2)
    assert corrupt.failure == (
        "update 3: its gradient, or the update, was not finite; paused, the weights of "
        f"update 2 kept (held-out loss {good[1]:.4g})"
    )
    assert same_bits(slot_bits(runtime, corrupt.slot), kept["corrupt"][2])
    (pause,) = [e for e in runtime.metrics.job_events if e["job"] == "corrupt"]
    assert pause["eval_loss"] == good[1] and pause["reason"] == corrupt.failure
    summary = runtime.metrics.summary()["adapters"]
    assert [e["status"] for e in summary["blowup"]["job_events"]] == ["paused"]

    # Paused, both adapters are still served: "corrupt" with its kept weights, "blowup"
    # (NaN logits: its tokens are meaningless) beside other requests.
    runtime.sync_model()
    corrupt_weights = ("corrupt@2", runtime.registry.export("corrupt"))
    rng = np.random.default_rng(7)
    for _ in range(3):
        prompt, _, sampling = pool_request(rng)
        traffic.add((prompt, "corrupt", sampling), corrupt_weights)
        diverged = runtime.submit(prompt, "blowup", sampling)
        TRIED["fault: requests to a diverged adapter (NaN logits) beside others"] += 1
        traffic.submit()
        runtime.run_until_idle()
        assert diverged.result().finish_reason == "length"
    check_pages(runtime)

    # Refused, leaving the jobs paused.
    with pytest.raises(DuplicateJobError, match=r"'corrupt' has a paused job .*resume_job"):
        runtime.add_job(CORRUPT)
    with pytest.raises(KeyError, match="no fine-tuning job 'nope'"):
        runtime.resume_job("nope")
    with pytest.raises(ValueError, match="job 'healthy' is done, not paused"):
        runtime.resume_job("healthy")
    with pytest.raises(KeyError, match=r"unknown hyperparameters \['lr'\]"):
        runtime.resume_job("corrupt", lr=1e-3)
    TRIED["duplicate fine-tuning jobs"] += 1
    TRIED["bad resume_job / replace_adapter / unload_adapter calls"] += 3
    assert corrupt.paused and blowup.paused

    # Resumed with the corrupted moments kept, it fails at the same update again...
    runtime.resume_job("corrupt")
    run_until(runtime, lambda: corrupt.paused, traffic, kept)
    assert corrupt.updates == 2 and corrupt.failure.startswith("update 3: its gradient")
    assert same_bits(slot_bits(runtime, corrupt.slot), kept["corrupt"][2])
    # ...and with a fresh optimizer state it trains to the end, from the kept weights.
    runtime.resume_job("corrupt", reset_optimizer=True)
    run_until(runtime, lambda: corrupt.done, traffic, kept)
    assert corrupt.status == "done" and corrupt.updates == CORRUPT.steps
    assert all(math.isfinite(loss) for _, loss in corrupt.train_loss + corrupt.eval_loss)
    assert not same_bits(kept["corrupt"][CORRUPT.steps], kept["corrupt"][2])
    assert events(runtime, "corrupt") == [("paused", 2), ("running", 2)] * 2

    # The diverged job resumes too, and pauses at once: its kept weights are what diverged.
    runtime.resume_job("blowup", reset_optimizer=True, learning_rate=1e-3)
    run_until(runtime, lambda: blowup.paused, traffic, kept)
    assert blowup.updates == 1 and re.match(rf"update 2: {NOT_FINITE}", blowup.failure)
    assert same_bits(slot_bits(runtime, blowup.slot), kept["blowup"][1])
    # Given earlier weights (as from a checkpoint), it trains on to its end.
    runtime.replace_adapter("blowup", initial["blowup"])
    assert same_bits(slot_bits(runtime, blowup.slot), kept["blowup"][0])
    runtime.resume_job("blowup", learning_rate=1e-3)
    run_until(runtime, lambda: blowup.done, traffic, kept)
    assert blowup.updates == BLOWUP.steps
    assert all(math.isfinite(loss) for _, loss in blowup.train_loss + blowup.eval_loss)
    assert max(np.abs(x.view(np.float32)).max() for x in kept["blowup"][BLOWUP.steps]) < 1
    assert events(runtime, "blowup") == [("paused", 1), ("running", 1)] * 2

    runtime.run_until_idle()
    assert runtime.num_free_pages == RUNTIME_CONFIG.serving.num_pages
    TRIED["completed: served beside faulty jobs, equal to alone"] += traffic.check()

    # The healthy job trained as it does alone.
    control = make_runtime()
    alone_run = control.add_job(HEALTHY)
    control.run_until_idle()
    # To rounding, not bit for bit: XLA's CPU matmuls can round a row differently with the
    # batch's row count, which the other jobs' rows change. On an AVX-512 AMD EPYC, weights
    # of up to ~0.14 were up to 1.2e-7 apart after 8 updates; CI's machine matched exactly.
    assert [u for u, _ in healthy.eval_loss] == [u for u, _ in alone_run.eval_loss]
    assert [u for u, _ in healthy.train_loss] == [u for u, _ in alone_run.train_loss]
    for ours, alone_losses in (
        (healthy.eval_loss, alone_run.eval_loss),
        (healthy.train_loss, alone_run.train_loss),
    ):
        np.testing.assert_allclose(
            [loss for _, loss in ours], [loss for _, loss in alone_losses], rtol=1e-6
        )
    for ours, alone_weights in zip(
        slot_bits(runtime, healthy.slot), slot_bits(control, alone_run.slot), strict=True
    ):
        np.testing.assert_allclose(ours.view(np.float32), alone_weights.view(np.float32), atol=1e-6)


def test_a_failure_completing_an_update_then_the_slot_reused():
    """A job's weights are overwritten with 1e30 (finite: corrupted memory) between the two
    micro-batches of its first update: the second's loss is NaN and is dropped, the
    optimizer applies the update with the first alone, and the pause counts and names
    that update, its weights kept. Its adapter unloaded (which drops the paused job), a
    new job gets its slot and trains; its own adapter cannot be unloaded meanwhile."""
    runtime = make_runtime()
    run = runtime.add_job(
        FineTuneJob("partial", records("upper", 20), LoraConfig(rank=4), batch_tokens=64)
    )
    kept: dict = {}
    # ~2-3 examples a step: the first step's rows stay below the 64-token batch.
    run_until(runtime, lambda: run._rows > 0, None, kept)
    assert run.updates == 0
    params = jax.tree.map(lambda x: x.at[run.slot].set(1e30), runtime._state.params)
    runtime._state = TrainState(params, runtime._state.opt)
    TRIED["fault: a job's weights overwritten (1e30) mid-update"] += 1
    run_until(runtime, lambda: run.paused, None, kept)
    assert run.updates == 1 and math.isfinite(run.train_loss[-1][1])
    assert run.failure.startswith(
        "the last micro-batch of update 1 (applied without it): the training loss was nan; "
        "paused, the weights of update 1 kept"
    )
    assert same_bits(slot_bits(runtime, run.slot), kept["partial"][1])

    runtime.unload_adapter("partial")
    assert "partial" not in runtime.jobs and "partial" not in runtime.registry.adapters
    successor = runtime.add_job(
        FineTuneJob("successor", records("upper", 20), LoraConfig(rank=4), batch_tokens=1)
    )
    assert successor.slot == run.slot
    run_until(runtime, lambda: successor.updates >= 2, None, kept)
    with pytest.raises(ValueError, match="'successor' is being trained by a running job"):
        runtime.unload_adapter("successor")
    TRIED["bad resume_job / replace_adapter / unload_adapter calls"] += 1
    run_until(runtime, lambda: successor.updates >= 3, None, kept)


def _poison_targets(runtime: Runtime, slot: int, dispatch: int) -> None:
    """Makes the ``dispatch``-th unified step's training targets of ``slot`` out of the
    vocabulary: that one micro-batch's loss is NaN (a transient fault)."""
    step, calls = runtime._step, []
    vocab = runtime.model_config.vocab_size

    def poisoned(frozen, state, batch, cache):
        calls.append(batch)
        if len(calls) == dispatch:
            ends = np.asarray(batch.lora.seg_ends)
            rows = np.repeat(np.asarray(batch.lora.seg_slots), np.diff(ends, prepend=0))
            mine = np.flatnonzero(rows[: batch.num_train_rows] == slot)
            assert mine.size
            batch = dataclasses.replace(batch, targets=batch.targets.at[mine].set(vocab))
        return step(frozen, state, batch, cache)

    runtime._step = poisoned


def _pause_and_resume(runtime: Runtime, step) -> dict:
    """HEALTHY, its third micro-batch poisoned, and BLOWUP trained with ``step()`` until
    both pause, then resumed (BLOWUP from its initial weights) to their ends; what came
    of them."""
    runs = {job.name: runtime.add_job(job) for job in (HEALTHY, BLOWUP)}
    _poison_targets(runtime, runs["healthy"].slot, dispatch=3)
    runtime.sync_model()
    initial = runtime.registry.export("blowup")
    while not all(run.paused for run in runs.values()):
        assert step()
    runtime.land()
    paused = {name: (run.updates, run.failure) for name, run in runs.items()}
    paused_bits = {name: slot_bits(runtime, run.slot) for name, run in runs.items()}
    runtime.replace_adapter("blowup", initial)
    runtime.resume_job("blowup", learning_rate=1e-3)
    runtime.resume_job("healthy")
    while step():
        pass
    runtime.land()
    return dict(
        paused=paused,
        paused_bits=paused_bits,
        losses={name: run.train_loss + run.eval_loss for name, run in runs.items()},
        weights={name: slot_bits(runtime, run.slot) for name, run in runs.items()},
    )


def test_a_pause_pipelined_equals_one_landed_step_by_step():
    """Pipelined, the step after a job's non-finite one is dispatched before the host
    knows of it: it halts the job's slot on the device, and its example goes back to the
    job. So a pause keeps the same weights bit for bit, with the same message, as with
    every step landed at once; and resumed, the jobs train the same examples to the same
    weights (to rounding: other rows in the batch change the summation order). HEALTHY's
    fault is transient (one poisoned micro-batch), so its next one is finite: without the
    halt, that step would update it."""
    runtime = make_runtime()

    def step_and_land() -> bool:
        stepped = runtime.step()
        runtime.land()
        return stepped

    landed = _pause_and_resume(runtime, step_and_land)
    pipelined_runtime = make_runtime()
    pipelined = _pause_and_resume(pipelined_runtime, pipelined_runtime.step)
    assert pipelined["paused"] == landed["paused"]
    assert landed["paused"]["healthy"][0] == 2 and landed["paused"]["blowup"][0] == 1
    for name in ("healthy", "blowup"):
        assert same_bits(pipelined["paused_bits"][name], landed["paused_bits"][name])
        ours, theirs = pipelined["losses"][name], landed["losses"][name]
        assert [u for u, _ in ours] == [u for u, _ in theirs]
        np.testing.assert_allclose([x for _, x in ours], [x for _, x in theirs], rtol=1e-6)
        for a, b in zip(pipelined["weights"][name], landed["weights"][name], strict=True):
            np.testing.assert_allclose(a.view(np.float32), b.view(np.float32), atol=1e-6)


def test_a_burst_beyond_the_page_pool_preempts_and_completes_everything(alone):
    """48 requests at once (~240 pages of demand against a 40-page pool) while a job
    trains: sequences are preempted and recomputed, and every request completes with its
    output alone; the pool is conserved after every step and full at the end."""
    runtime = make_runtime()
    job = runtime.add_job(
        FineTuneJob(
            "upper", records("upper", 40), LoraConfig(rank=4), hyperparams={"learning_rate": 3e-3}
        )
    )
    rng = np.random.default_rng(2)
    traffic = Traffic(runtime, alone, seed=0, in_flight=0)
    for _ in range(48):
        traffic.add(pool_request(rng))
    run_until(runtime, lambda: not runtime.num_unfinished, None, {})
    preemptions = runtime.stats.preemptions
    TRIED["fault: preemptions under a burst (KV pages exhausted)"] += preemptions
    assert preemptions > 0 and job.updates > 0
    assert runtime.num_free_pages == RUNTIME_CONFIG.serving.num_pages
    TRIED["completed: burst, equal to alone"] += traffic.check()


def test_cancelled_requests_free_their_pages(alone):
    """In a burst under training, a request cancelled while running, one still waiting,
    and one preempted: each frees its pages at once (pool conserved), ends "cancelled"
    with a prefix of its output alone, and is not reported as served; cancelling again or
    after the end changes nothing; every other request completes as alone."""
    runtime = make_runtime()
    runtime.add_job(FineTuneJob("upper", records("upper", 40), LoraConfig(rank=4)))
    rng = np.random.default_rng(3)
    requests = [pool_request(rng) for _ in range(32)]
    handles = [runtime.submit(*request) for request in requests]
    scheduler = runtime._scheduler
    cancelled: dict[str, int] = {}  # kind -> index into handles

    def find(kind):
        for i, handle in enumerate(handles):
            seq = handle._request.seq
            if handle.done or i in cancelled.values():
                continue
            running = seq in scheduler.running
            if kind == "running" and running and seq.num_generated > 0:
                return i
            if kind == "waiting" and not running and seq.num_generated == 0:
                return i
            if kind == "preempted" and not running and seq.num_generated > 0:
                return i
        return None

    def cancel_each_kind():
        for kind in ("running", "waiting", "preempted"):
            i = None if kind in cancelled else find(kind)
            if i is not None:
                free, held = runtime.num_free_pages, len(handles[i]._request.seq.pages)
                handles[i].cancel()
                assert runtime.num_free_pages == free + held
                check_pages(runtime)
                cancelled[kind] = i
        return len(cancelled) == 3 or not runtime.num_unfinished

    run_until(runtime, cancel_each_kind, None, {})
    assert sorted(cancelled) == ["preempted", "running", "waiting"]
    TRIED["fault: requests cancelled (running, waiting, preempted)"] += len(cancelled)
    outputs = {i: handles[i].output() for i in cancelled.values()}
    for i in cancelled.values():
        handles[i].cancel()  # again: a no-op
        assert handles[i].output() == outputs[i]
    run_until(runtime, lambda: not runtime.num_unfinished, None, {})
    assert runtime.num_free_pages == RUNTIME_CONFIG.serving.num_pages

    done = 0
    for i, (handle, request) in enumerate(zip(handles, requests, strict=True)):
        out, ref = handle.result(), alone(*request)
        if i in cancelled.values():
            assert out.finish_reason == "cancelled"
            assert out.token_ids == ref.token_ids[: len(out.token_ids)]
        else:
            handle.cancel()  # after the end: a no-op
            assert same_output(handle.result(), ref), request
            done += 1
    assert len(runtime.metrics.requests) == done
    TRIED["completed: beside cancelled ones, equal to alone"] += done
