"""The coordinator-side state of one generation: tokens so far, text, stop conditions.

A :class:`GenerationState` is fed one sampled token at a time (:meth:`push`) and says what new
text the client may see and whether generation is over. Text is decoded from the whole
generated sequence each time (incremental decoding of byte-level BPE would split multi-byte
characters), and text that could still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from swarm.errors import InvalidRequestError
from swarm.inference.sampling import SamplingParams, find_stop

FINISH_REASONS = ("length", "stop", "eos")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEvent:
    """What one push produced: new ids, the text that became final, and the end if any."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None


class GenerationState:
    """Tokens and text of one session. Not thread-safe: one driver owns it.

    ``decode`` maps token ids to text (the model's tokenizer); ``eos_token_id`` ends the
    generation (it is kept in ``generated`` but not in the text).
    """

    def __init__(
        self,
        *,
        prompt_ids: list[int],
        params: SamplingParams,
        decode: Callable[[list[int]], str],
        eos_token_id: int | None = None,
    ) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: send at least one token of text")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self._decode = decode
        self._eos = eos_token_id
        self._text = ""  # decoded text of `generated` (without eos), stop string cut off
        self._emitted = 0  # characters of _text already given to the client

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def eos_token_id(self) -> int | None:
        return self._eos

    @property
    def all_ids(self) -> list[int]:
        """Prompt plus generated tokens: what a replay must prefill."""
        return self.prompt_ids + self.generated

    @property
    def text(self) -> str:
        return self._text[: self._emitted]

    def push(self, token_id: int) -> TokenEvent:
        if self.done:
            raise RuntimeError("push after the generation finished")
        self.generated.append(int(token_id))
        finish = None
        if self._eos is not None and token_id == self._eos:
            finish = "eos"
            ids = self.generated[:-1]
        else:
            ids = self.generated
        before = len(self._text)
        text = self._decode(ids)
        # a trailing U+FFFD means an incomplete UTF-8 sequence: wait for the next token
        hold = 0
        while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
            hold += 1
        stop_at = find_stop(text, self.params.stop, search_from=min(before, len(text)))
        if stop_at is not None:
            text, finish, hold = text[:stop_at], "stop", 0
        if finish is None and len(self.generated) >= self.params.max_new_tokens:
            finish, hold = "length", 0
        self._text = text
        visible = len(text) - hold
        if finish is None and self.params.stop:
            # hold back a suffix that is a prefix of some stop string
            longest = 0
            for s in self.params.stop:
                for k in range(min(len(s) - 1, visible), 0, -1):
                    if text[visible - k : visible] == s[:k]:
                        longest = max(longest, k)
                        break
            visible -= longest
        new_text = ""
        if finish is not None:
            visible = len(text)
        if visible > self._emitted:
            new_text = text[self._emitted : visible]
            self._emitted = visible
        self.finish_reason = finish
        return TokenEvent(token_ids=(int(token_id),), text=new_text, finish_reason=finish)
