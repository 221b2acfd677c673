"""Text in and out of the engine through a ``transformers`` tokenizer: prompts to token
ids (chat templates included), and generated ids back to text, released as it becomes
final and cut at stop strings."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loqjax.request import InvalidPromptError

# Text, token ids, or chat messages ({"role": ..., "content": ...} each).
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def load_tokenizer(source: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of a local checkpoint directory (never downloads)."""
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def encode_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """A prompt's token ids.

    Text is tokenized with the tokenizer's special tokens (e.g. BOS); chat messages are
    rendered by its chat template with the assistant's generation prompt appended; ids
    pass through unchanged (the caller checks them against the vocabulary).

    Raises:
      InvalidPromptError: empty or of no known form, text with lone surrogates, text or
        messages without a tokenizer, messages without a chat template or that it cannot
        render.
    """
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1:
            raise InvalidPromptError(f"a token id array must be 1-D, got shape {prompt.shape}")
        prompt = prompt.tolist()
    if not isinstance(prompt, str | Sequence) or isinstance(prompt, bytes):
        raise InvalidPromptError(
            f"a prompt is text, token ids or chat messages, got {type(prompt).__name__}"
        )
    if len(prompt) == 0:
        raise InvalidPromptError("the prompt is empty")
    if isinstance(prompt, str):
        try:
            prompt.encode()
        except UnicodeEncodeError as e:
            raise InvalidPromptError(f"the prompt is not valid Unicode: {e}") from e
        return list(_require(tokenizer, "a text prompt")(prompt)["input_ids"])
    if all(isinstance(m, Mapping) for m in prompt):
        tokenizer = _require(tokenizer, "a chat prompt")
        if tokenizer.chat_template is None:
            raise InvalidPromptError("the tokenizer has no chat template for a chat prompt")
        try:
            encoding = tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as e:  # template errors come from jinja, in many types
            raise InvalidPromptError(f"the chat template cannot render the messages: {e}") from e
        return list(encoding["input_ids"])
    if all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    raise InvalidPromptError("a prompt sequence must hold only token ids or only chat messages")


def _require(tokenizer, what: str) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise InvalidPromptError(f"{what} needs a tokenizer; the engine has none (pass ids)")
    return tokenizer


class TextStream:
    """Incremental detokenization of one request's generated ids, cut at stop strings.

    Text is released once final: not while its tail is an incomplete character (U+FFFD)
    nor while the tail could still grow into a stop string. Ids are decoded in a short
    window that starts one release back, so tokenizers whose pieces depend on their
    left neighbour (e.g. SentencePiece's leading spaces) decode as in one piece.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] are decoded again, as context only
        self._read = 0  # ids[_read:] are not in `text` yet
        self._released = 0  # characters of `text` handed out
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Appends a generated id; returns the text it releases. Once a stop string
        appears, ``stopped`` is set, ``text`` ends before it and further ids are ignored."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            self._extend(window[len(context) :])
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """Releases all that is left: held-back text and a trailing incomplete character."""
        if not self.stopped and self._read < len(self._ids):
            context = self._decode(self._ids[self._prefix : self._read])
            self._extend(self._decode(self._ids[self._prefix :])[len(context) :])
            self._read = len(self._ids)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _extend(self, new: str) -> None:
        # A match ends in the new text but may start in the last len(stop) - 1 characters.
        longest = max(map(len, self._stop), default=0)
        search_from = max(0, len(self.text) - longest + 1)
        self.text += new
        starts = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if starts:
            self.text = self.text[: min(starts)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        released, self._released = self.text[self._released : end], end
        return released

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        return max(
            (n for s in self._stop for n in range(1, len(s)) if self.text.endswith(s[:n])),
            default=0,
        )
