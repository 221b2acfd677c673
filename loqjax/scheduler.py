"""Continuous batching: which sequences the next step computes, how many tokens each, and
in which KV cache pages.

A step packs at most ``token_capacity`` tokens of at most ``max_seqs`` sequences. Running
sequences come first, oldest first: a decoding one takes its one new token, a prefilling
one the next chunk of its prompt, leaving one token for every running sequence after it.
Waiting requests are then admitted in arrival order while tokens, sequence rows and free
pages for their first chunk last (admission control).

Pages are taken as sequences grow. When a running sequence needs pages and none are free,
the newest running sequence is preempted: its pages are freed and it goes back to the
head of the queue, to be recomputed later from its prompt and the tokens it has already
generated. The oldest running sequence is never preempted for a newer one, and any one
sequence fits the pool alone, so every request finishes.
"""

from __future__ import annotations

import collections
import dataclasses

from loqjax.kv_cache import PagePool
from loqjax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Limits of the serving engine, and so the static shapes of its step.

    Attributes:
      token_capacity: T, tokens per step (prefill chunks and decode tokens together).
      max_seqs: S, sequences per step, <= T; also the number of LoRA segments.
      page_size: tokens per KV cache page.
      num_pages: pages in the pool (per layer); must hold one ``max_seq_len`` sequence.
      max_seq_len: prompt plus generated tokens of one sequence, at most.
      token_buckets: the static batch sizes a step may run at, each compiled once; a step
        takes the smallest that holds its tokens. Default ``(token_capacity,)``; e.g.
        ``(max_seqs, token_capacity)`` runs decode-only steps at S rows.
    """

    token_capacity: int = 128
    max_seqs: int = 16
    page_size: int = 16
    num_pages: int = 512
    max_seq_len: int = 1024
    token_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "token_buckets":
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
        buckets = tuple(sorted(set(self.token_buckets) | {self.token_capacity}))
        if any(not isinstance(b, int) or not 1 <= b <= self.token_capacity for b in buckets):
            raise ValueError(
                f"token_buckets must be integers in [1, token_capacity={self.token_capacity}], "
                f"got {self.token_buckets!r}"
            )
        object.__setattr__(self, "token_buckets", buckets)
        if self.max_seqs > self.token_capacity:
            raise ValueError(
                f"max_seqs={self.max_seqs} exceeds token_capacity={self.token_capacity}: "
                "every running sequence needs a token each step"
            )
        if self.num_pages < self.pages_per_seq:
            raise ValueError(
                f"num_pages={self.num_pages} cannot hold one sequence of max_seq_len="
                f"{self.max_seq_len} ({self.pages_per_seq} pages of {self.page_size})"
            )

    @property
    def pages_per_seq(self) -> int:
        """M, the page table width: pages of a ``max_seq_len`` sequence."""
        return -(-self.max_seq_len // self.page_size)


@dataclasses.dataclass(eq=False)
class SequenceState:
    """A request's scheduling state.

    Attributes:
      token_ids: the prompt, then the generated ids.
      seed: the sampling seed, resolved.
      pages: its KV cache pages, in position order.
      num_computed: leading tokens whose keys and values are in ``pages``.
    """

    request_id: int
    token_ids: list[int]
    prompt_len: int
    adapter: str | None
    params: SamplingParams
    seed: int
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, stop)`` of ``seq``, computed in one step."""

    seq: SequenceState
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


class Scheduler:
    """Waiting and running sequences, and the page pool they share."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.pool = PagePool(config.num_pages, config.page_size)
        self.waiting: collections.deque[SequenceState] = collections.deque()
        self.running: list[SequenceState] = []  # in admission order
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def remove(self, seq: SequenceState) -> None:
        """Drops a finished or cancelled sequence and frees its pages."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free_pages(seq)

    def schedule(self, budget: int | None = None) -> list[Chunk]:
        """The next step's chunks, in packing order, within ``budget`` tokens (default
        and at most the token capacity, at least ``max_seqs``, so that every running
        sequence gets a token); allocates their pages.

        The caller sets each ``seq.num_computed = chunk.stop`` once the step has run.
        """
        capacity = self.config.token_capacity
        budget = capacity if budget is None else min(budget, capacity)
        if budget < self.config.max_seqs:
            raise ValueError(f"budget={budget} is below max_seqs={self.config.max_seqs}")
        chunks = []
        preemptions = self.num_preemptions
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            later = len(self.running) - i - 1
            if seq.num_computed == len(seq.token_ids):  # its last token is being sampled
                i += 1
                continue
            stop = seq.num_computed + min(len(seq.token_ids) - seq.num_computed, budget - later)
            if not self._grow(seq, stop):
                break  # seq itself was preempted: it was the newest
            chunks.append(Chunk(seq, seq.num_computed, stop))
            budget -= stop - seq.num_computed
            i += 1
        # Readmitting just-preempted sequences would only thrash.
        preempted = self.num_preemptions > preemptions
        while not preempted and self.waiting and len(self.running) < self.config.max_seqs:
            seq = self.waiting[0]
            stop = min(len(seq.token_ids), budget)
            if stop == 0 or not self._grow(seq, stop, preempt=False):
                break
            self.running.append(self.waiting.popleft())
            chunks.append(Chunk(seq, 0, stop))
            budget -= stop
        return chunks

    def _grow(self, seq: SequenceState, num_tokens: int, preempt: bool = True) -> bool:
        """Gives ``seq`` the pages for its first ``num_tokens`` tokens, preempting the
        newest running sequences while pages are short (if ``preempt``). False if none
        could be had, or ``seq`` itself was preempted."""
        need = self.pool.pages_for(num_tokens) - len(seq.pages)
        while (pages := self.pool.allocate(need)) is None:
            if not preempt:
                return False
            victim = self.running.pop()
            self._free_pages(victim)
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
            if victim is seq:
                return False
        seq.pages += pages
        return True

    def _free_pages(self, seq: SequenceState) -> None:
        self.pool.free(seq.pages)
        seq.pages = []
        seq.num_computed = 0
