"""A serving request from the outside: why it can be rejected, and what it produces."""

from __future__ import annotations

import dataclasses
from typing import Literal

# "stop": a stop token or stop string; "length": max_tokens or the context filled up;
# "cancelled": by the caller; "aborted": its adapter was unloaded while it ran.
FinishReason = Literal["stop", "length", "cancelled", "aborted"]


class RequestError(ValueError):
    """A request was rejected at submit; no other request was affected."""


class InvalidPromptError(RequestError):
    """The prompt is empty, malformed, has out-of-vocabulary ids, or needs a tokenizer
    (or a chat template) the engine does not have."""


class PromptTooLongError(InvalidPromptError):
    """The prompt leaves no room for a generated token within the engine's context."""


class InvalidSamplingParamsError(RequestError):
    """A sampling parameter is out of range or of the wrong type."""


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One generated token, as soon as it is produced.

    Attributes:
      token_id: the token.
      text: text that became final with it (possibly empty: an incomplete character, a
        possible stop string, or no tokenizer); a request's event texts add up to its
        output text.
    """

    token_id: int
    text: str


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A request's generation so far (final once ``finish_reason`` is set).

    Attributes:
      token_ids: generated ids; a stop token that ended the generation is included.
      text: their decoded text, special and stop tokens left out and cut before a stop
        string; None without a tokenizer.
      arrival_time: when the request was submitted, on the engine's clock (s).
      token_times: when each generated token came back, on the same clock. Timings are
        left out of equality: two outputs are equal when they generated the same.
    """

    request_id: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str | None
    finish_reason: FinishReason | None
    arrival_time: float = dataclasses.field(default=0.0, compare=False)
    token_times: tuple[float, ...] = dataclasses.field(default=(), compare=False)
