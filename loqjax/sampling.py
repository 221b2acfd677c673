"""Per-request token sampling: parameters, their per-step device batch, and the sampler.

The i-th generated token of a request is drawn with the key ``fold_in(key(seed), i)``,
so what a request gets depends only on its seed and its own logits, never on which
other requests share the batch, in which row, or whether it was preempted meanwhile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from loqjax.request import InvalidSamplingParamsError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops; checked on construction.

    Processing follows ``transformers``: repetition penalty, then temperature, top-k and
    top-p.

    Attributes:
      temperature: 0 takes the most likely token (greedy); > 0 samples from
        ``softmax(logits / temperature)``.
      top_k: sample among the k most likely tokens only; 0 means all.
      top_p: sample from the smallest set of most likely tokens whose probability
        reaches top_p (nucleus sampling), in (0, 1]; 1 means all.
      repetition_penalty: > 0; every token already in the prompt or the output has its
        logit divided by it if positive, multiplied if not (greedy included); 1 is off.
      seed: in [0, 2**32); None lets the engine draw one.
      max_tokens: generate at most this many tokens, >= 1.
      stop_token_ids: ids that end the generation, besides the engine's end-of-sequence
        ids.
      stop: strings that end the generation; the output text is cut before the first.
      ignore_eos: do not stop at the engine's end-of-sequence ids.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] | str = ()
    ignore_eos: bool = False

    def __post_init__(self):
        # Sequences become tuples, so the params stay hashable and immutable.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", _as_tuple(stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        checks = {
            "temperature": (
                _is_number(self.temperature) and self.temperature >= 0,
                "a finite number >= 0",
            ),
            "top_k": (_is_int(self.top_k) and self.top_k >= 0, "an integer >= 0"),
            "top_p": (_is_number(self.top_p) and 0 < self.top_p <= 1, "a finite number in (0, 1]"),
            "repetition_penalty": (
                _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
                "a finite number > 0",
            ),
            "seed": (
                self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32),
                "None or an integer in [0, 2**32)",
            ),
            "max_tokens": (_is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            "stop_token_ids": (all(_is_int(i) and i >= 0 for i in self.stop_token_ids), "ids >= 0"),
            "stop": (all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            "ignore_eos": (isinstance(self.ignore_eos, bool), "a bool"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise InvalidSamplingParamsError(
                    f"{name} must be {expected}, got {getattr(self, name)!r}"
                )


def _as_tuple(items, name: str) -> tuple:
    try:
        return tuple(items)
    except TypeError:
        raise InvalidSamplingParamsError(f"{name} must be a sequence, got {items!r}") from None


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_number(x) -> bool:
    real = isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
    return real and math.isfinite(x)


class SamplingStages(NamedTuple):
    """Which stages of the sampler a batch runs, each one over the whole [S, V] logits:
    the repetition penalty's scatter, top-k/top-p's sort over the vocabulary, and the
    random draw. The host knows them from the requests' parameters, so they are static:
    a device-side ``lax.cond`` would make every step wait on the host (a GPU conditional
    reads its predicate back), and an all-greedy step costs one argmax."""

    penalize: bool = False
    truncate: bool = False
    draw: bool = False

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> SamplingStages:
        """The stages a batch of requests with these parameters needs."""
        return cls(
            penalize=any(p.repetition_penalty != 1.0 for p in params),
            truncate=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
            draw=any(p.temperature > 0 for p in params),
        )

    def __or__(self, other: SamplingStages) -> SamplingStages:
        return SamplingStages(*(a or b for a, b in zip(self, other, strict=True)))

    @classmethod
    def combinations(cls, params: Sequence[SamplingParams]) -> set[SamplingStages]:
        """Every set of stages a step can need when it mixes requests with any of these
        parameters (and greedy ones): the unions of their stages."""
        found = {ARGMAX_ONLY}
        for p in params:
            found |= {stages | cls.of([p]) for stages in found}
        return found


# The stages of an all-greedy batch: none, one argmax.
ARGMAX_ONLY = SamplingStages()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """The sampling parameters of one step's S rows (one per sequence).

    Attributes:
      temperature, top_p, repetition_penalty: float32 [S].
      top_k: int32 [S], 0 for all tokens.
      seeds: uint32 [S]; steps: int32 [S], the index of the token each row generates.
      seen: int32 [S, C], ids that get the repetition penalty, padded with the
        out-of-range id ``vocab_size``.
      stages: static, the sampler stages the rows need (at least).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    seeds: jax.Array
    steps: jax.Array
    seen: jax.Array
    stages: SamplingStages = dataclasses.field(default=ARGMAX_ONLY, metadata=dict(static=True))

    @classmethod
    def pack(cls, *args, **kwargs) -> SamplingBatch:
        """``pack_host`` (same arguments) on the default device, in one transfer."""
        return jax.device_put(cls.pack_host(*args, **kwargs))

    @classmethod
    def pack_host(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        seen: Sequence[Sequence[int]],
        num_rows: int,
        seen_capacity: int,
        vocab_size: int,
    ) -> SamplingBatch:
        """Rows for the first ``len(params)`` sequences, the rest greedy filler, as numpy
        arrays (for a caller that puts them on the device inside a larger batch).

        Args:
          params, seeds, steps: per sequence, with the ``SamplingParams``' seed resolved.
          seen: per sequence, its prompt and output ids so far; only read for sequences
            with a repetition penalty.
          num_rows: S; seen_capacity: C, at least every ``len(seen[i])``.
        """
        n = len(params)
        temperature = np.zeros(num_rows, np.float32)
        top_k = np.zeros(num_rows, np.int32)
        top_p = np.ones(num_rows, np.float32)
        penalty = np.ones(num_rows, np.float32)
        seed_rows = np.zeros(num_rows, np.uint32)
        step_rows = np.zeros(num_rows, np.int32)
        seen_rows = np.full((num_rows, seen_capacity), vocab_size, np.int32)
        temperature[:n] = [p.temperature for p in params]
        top_k[:n] = [p.top_k for p in params]
        top_p[:n] = [p.top_p for p in params]
        penalty[:n] = [p.repetition_penalty for p in params]
        seed_rows[:n] = seeds
        step_rows[:n] = steps
        for row, (p, ids) in enumerate(zip(params, seen, strict=True)):
            if p.repetition_penalty != 1.0:
                seen_rows[row, : len(ids)] = ids
        return cls(
            temperature,
            top_k,
            top_p,
            penalty,
            seed_rows,
            step_rows,
            seen_rows,
            SamplingStages.of(params),
        )

    def with_stages(self, stages: SamplingStages) -> SamplingBatch:
        """This batch running at least ``stages`` too: the rows sample the same, the step
        is the variant compiled for the union (a warm-up compiles variants this way)."""
        return dataclasses.replace(self, stages=self.stages | stages)


def sample(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Next token of every row: float32 logits [S, V] -> int32 [S].

    Runs only the stages in ``batch.stages``: an all-greedy batch costs one argmax.
    """
    logits = warp_logits(logits, batch)
    # Warping keeps the most likely token on top, so greedy rows take the argmax here.
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not batch.stages.draw:
        return greedy
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
        batch.seeds, batch.steps
    )
    sampled = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    return jnp.where(batch.temperature > 0, sampled, greedy)


def warp_logits(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """The logits each row samples from, float32 [S, V]: repetition penalty, temperature
    (1 for greedy rows), then top-k and top-p, with -inf outside the kept tokens (the
    stages ``batch.stages`` leaves out are identities for its rows)."""
    if batch.stages.penalize:
        logits = _penalize_repeats(logits, batch.seen, batch.repetition_penalty)
    if batch.stages.draw:
        logits = logits / jnp.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    if batch.stages.truncate:
        logits = _top_k_top_p(logits, batch.top_k, batch.top_p)
    return logits


def _penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` on the ids in ``seen``."""
    rows = jnp.arange(logits.shape[0])[:, None]
    is_seen = jnp.zeros(logits.shape, bool).at[rows, seen].set(True, mode="drop")
    penalty = penalty[:, None]
    return jnp.where(is_seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def _top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets the logits outside each row's top-k, then outside its top-p nucleus, to -inf.

    A token is in the nucleus iff the tokens strictly more likely than it hold less than
    top_p of the (top-k) probability, so the most likely token always is; ties with the
    last kept logit are kept too.
    """
    vocab = logits.shape[-1]
    ranked = jnp.sort(logits, axis=-1, descending=True)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab) < k[:, None]
    ranked = jnp.where(in_top_k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    kept = in_top_k & (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None])
    threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)
