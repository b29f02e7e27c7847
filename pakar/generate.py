"""Text generation: the tokenizer, the chat template, stop strings and UTF-8-safe streaming over the
token-level engine (pakar/engine.py). Used by `pakar chat`, `pakar chat-batch` and `pakar serve`.

Public API (everything a caller needs; the server builds on exactly this):

    TextGenerator(model, tokenizer, chat=False)         # or TextGenerator.from_checkpoint(path, device, dtype)
        .chat: bool                 True: message prompts use the ChatML template (checkpoint meta "chat")
        .context_window: int        the model's max positions
        .encode(prompt) -> list[int]                     str (raw text) or messages [{"role", "content"}]
        .check(request) -> int      prompt tokens; raises ContextLengthError / PakarError (HTTP 400)
        .fit_messages(messages, reserve) -> list[dict]   drop the oldest turns until the prompt fits
        .start(requests) -> TextBatch                    prefill; then drive it step by step
        .stream(requests) -> Iterator[list[Delta]]       convenience: start() + step() until done
        .generate(requests) -> list[Completion]
    Request(prompt, params=SamplingParams(...), stop=("###",))   one prompt, its own sampling and stop strings
    TextBatch
        .add(requests) -> list[int]     join a running batch (continuous batching); returns indices
        .step() -> list[Delta]          one token per active row; at most one Delta per row
        .cancel(index)                  the row ends at the next step with finish_reason "cancelled"
        .active -> int                  rows still generating
        .completions: dict[int, Completion]    filled as rows finish
    Delta(index, text, finish_reason)   new text of row `index` (may be ""); finish_reason None while running
    Completion(index, text, token_ids, prompt_tokens, completion_tokens, finish_reason,
               time_to_first_token, seconds)
    SamplingParams, ContextLengthError  re-exported from pakar.engine

Indices are the requests' positions in the first start()/add() call, continuing upwards on later add()s.
Usage counts follow OpenAI: prompt_tokens = tokens of the encoded prompt; completion_tokens = tokens
sampled (a stop token included); finish_reason "stop" (stop token or stop string), "length"
(max_new_tokens or the context window), "cancelled" or "error" (that row's sampling failed; the
other rows of the batch go on, see pakar/engine.py).

Design choices:

- Prompts. Messages on a chat model (checkpoint meta "chat": True) are encoded with
  pakar.tokenizer.encode_chat plus the assistant generation prompt, exactly the ids the model was
  fine-tuned on. A raw string is encoded as text, after <|endoftext|>: the token shards put that
  separator before every document but the first, so the model reads it as "a new document starts
  here". Messages on a model that was only pretrained are joined as plain text (contents, one per
  line): such a model has never seen the chat markers, and continuing text is the best it can do.
- Stopping. The special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) always stop a row: a
  pretrained model ends a document with <|endoftext|>, a chat model ends its turn with <|im_end|>,
  and <|im_start|> would begin a turn that is not the model's to write. Stop strings are matched
  on the decoded text; the text is cut before the stop string, and text that might be the start of a
  stop string is held back until it is clear that it is not.
- UTF-8-safe streaming. A byte-level token may carry part of a multi-byte character. Each row keeps
  two offsets into its ids (vLLM's incremental detokenizer): new text is decode(ids[prefix:]) minus
  decode(ids[prefix:read]), emitted only when it does not end in U+FFFD (an incomplete character);
  the offsets then advance. Decoding the short window is O(1) per token, and the deltas concatenate to
  exactly tokenizer.decode(ids). Bytes that never complete a character are flushed at the end as
  U+FFFD, as a full decode would show them (after MAX_PENDING_TOKENS such tokens in a row, which only
  a broken model produces, they are flushed as they stand, to keep the window short).
- Context window: see pakar/engine.py. `check()` raises before any work; `fit_messages` is the
  conversation policy (the REPL's): keep the system message and the newest turns whose prompt leaves
  `reserve` tokens for the answer, dropping the oldest turns first.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from pakar import PakarError
from pakar.checkpoint import build_model, safe_load
from pakar.engine import STOP, ContextLengthError, Engine, SamplingParams
from pakar.quant import check_int8, maybe_quantize
from pakar.tokenizer import encode_chat, validate_messages

__all__ = ["TextGenerator", "TextBatch", "Request", "Delta", "Completion", "SamplingParams", "ContextLengthError"]

Prompt = str | list[dict]
MAX_PENDING_TOKENS = 16  # tokens held back waiting for a character to complete, at most


@dataclass
class Request:
    prompt: Prompt  # raw text, or chat messages [{"role": "system"|"user"|"assistant", "content": str}]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one found


@dataclass
class Delta:
    index: int
    text: str  # new text since the previous Delta of this row (may be empty)
    finish_reason: str | None = None  # None while the row continues


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]  # sampled ids, a final stop token excluded
    prompt_tokens: int
    completion_tokens: int  # every sampled token, a stop token included
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    time_to_first_token: float  # seconds from the row's start (prefill included) to its first token
    seconds: float  # from the row's start to its end


class _RowText:
    """Incremental, UTF-8-safe detokenization and stop-string matching for one row."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tok = tokenizer
        self.stops = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decodes to the end of `text`
        self.prefix_text = ""
        self.text = ""  # decoded so far (complete characters)
        self.emitted = 0  # characters of `text` handed out
        self.stopped = False  # a stop string was found; `text` ends before it

    def push(self, token: int) -> str:
        self.ids.append(token)
        new = self.tok.decode(self.ids[self.prefix:])
        complete = len(new) > len(self.prefix_text) and not new.endswith("\ufffd")
        # A character is at most 4 bytes: a longer run of tokens that never completes one is broken
        # output (an untrained model); take it as it stands, so the decoded window stays short.
        if complete or len(self.ids) - self.read > MAX_PENDING_TOKENS:
            self._extend(new[len(self.prefix_text):])
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush what is left (incomplete bytes come out as U+FFFD, as in a full decode)."""
        if not self.stopped and self.read < len(self.ids):
            new = self.tok.decode(self.ids[self.prefix:])
            self._extend(new[len(self.prefix_text):])
        return self._emit(final=True)

    def _extend(self, piece: str) -> None:
        if self.stopped:
            return
        start = max(0, len(self.text) - self.hold)  # a stop string may straddle the old and new text
        self.text += piece
        cut = min((j for j in (self.text.find(s, start) for s in self.stops) if j >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True

    def _emit(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped and self.stops:
            # hold back the longest tail that could still grow into a stop string
            for k in range(min(self.hold, end), 0, -1):
                tail = self.text[end - k:]
                if any(s.startswith(tail) for s in self.stops):
                    end -= k
                    break
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


@dataclass
class _Slot:
    row_text: _RowText
    prompt_tokens: int
    started: float
    first_token: float | None = None
    sampled: int = 0


class TextGenerator:
    def __init__(self, model: torch.nn.Module, tokenizer, chat: bool = False):
        self.engine = Engine(model)
        self.tokenizer = tokenizer
        self.chat = bool(chat)
        self.special_ids = (tokenizer.eot_id, tokenizer.im_start_id, tokenizer.im_end_id)

    @property
    def context_window(self) -> int:
        return self.engine.context_window

    @classmethod
    def from_ckpt(cls, ckpt: dict, device="cpu", dtype: torch.dtype | None = None,
                  chat: bool | None = None, quantize: str | None = None) -> "TextGenerator":
        """From a loaded checkpoint dict; chat mode is the checkpoint's own (meta "chat") unless given;
        quantize "int8" swaps in 8-bit weights (pakar.quant; CPU)."""

        if quantize == "int8":
            check_int8(device, dtype)  # before building: a GPU user gets one line, not a loaded model
        model, tokenizer = build_model(ckpt, device, dtype)
        model = maybe_quantize(model, quantize)
        return cls(model, tokenizer, chat=bool(ckpt.get("meta", {}).get("chat", False)) if chat is None else chat)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype: torch.dtype | None = None) -> "TextGenerator":

        return cls.from_ckpt(safe_load(path), device, dtype)

    # --- prompts ----------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return [self.tokenizer.eot_id, *self.tokenizer.encode(prompt)]
        if not isinstance(prompt, list):
            raise PakarError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        if self.chat:

            return encode_chat(self.tokenizer, prompt, add_generation_prompt=True)[0]

        validate_messages(prompt)
        return self.encode("\n".join(m["content"] for m in prompt) + "\n")

    def check(self, request: Request) -> int:
        """Prompt tokens of `request`; ContextLengthError if it does not fit, PakarError if invalid."""
        ids = self.encode(request.prompt)
        self.engine.check_prompt(ids)
        return len(ids)

    def fit_messages(self, messages: list[dict], reserve: int) -> list[dict]:
        """The newest suffix of the conversation (plus a leading system message) whose prompt leaves
        `reserve` tokens of the window for the answer. Turns are dropped oldest first; the last
        message is always kept, and ContextLengthError says so if it cannot fit even alone."""
        budget = self.context_window - max(1, reserve)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        for start in range(len(turns)):
            if turns[start]["role"] == "assistant" and start > 0:
                continue  # never open the history with an orphaned answer
            kept = system + turns[start:]
            if len(self.encode(kept)) <= budget:
                return kept
        if system and len(self.encode(turns[-1:])) <= budget:
            return turns[-1:]  # the system prompt alone is too long: keep the user's message
        n = len(self.encode(turns[-1:]))
        raise ContextLengthError(f"the message is {n} tokens; with {reserve} tokens kept for the answer "
                                 f"the context window of {self.context_window} tokens leaves room for "
                                 f"{budget} (shorten it, or lower the answer length)")

    # --- generation -------------------------------------------------------------------------------
    def start(self, requests: Sequence[Request]) -> "TextBatch":
        batch = TextBatch(self)
        batch.add(requests)
        return batch

    def stream(self, requests: Sequence[Request]) -> Iterator[list[Delta]]:
        batch = self.start(requests)
        while batch.active:
            yield batch.step()

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        batch = self.start(requests)
        while batch.active:
            batch.step()
        return [batch.completions[i] for i in range(len(requests))]


class TextBatch:
    """A running batch of text requests over one engine Batch. Drive it from one thread."""

    def __init__(self, generator: TextGenerator):
        self.gen = generator
        self.batch = generator.engine.new_batch()
        # a request's index is its engine row id (consecutive from 0 in the order requests are added)
        self.slots: dict[int, _Slot] = {}  # live request index -> slot
        self.completions: dict[int, Completion] = {}

    @property
    def active(self) -> int:
        return self.batch.active

    def add(self, requests: Sequence[Request]) -> list[int]:
        """Encode and prefill `requests`; raises ContextLengthError/PakarError (naming the request when
        there are several) before touching the running batch."""
        prompts = []
        for i, r in enumerate(requests):
            try:
                ids = self.gen.encode(r.prompt)
                self.gen.engine.check_prompt(ids)
            except PakarError as e:
                if len(requests) > 1:
                    raise type(e)(f"request {i}: {e}") from None
                raise
            prompts.append(ids)
        params = [r.params if r.params is not None else SamplingParams() for r in requests]
        params = [p if set(self.gen.special_ids) <= set(p.stop_token_ids) else
                  dataclasses.replace(p, stop_token_ids=(*p.stop_token_ids, *self.gen.special_ids)) for p in params]
        t0 = time.perf_counter()
        rows = self.batch.add(prompts, params)
        for row, r, ids in zip(rows, requests, prompts):
            self.slots[row] = _Slot(_RowText(self.gen.tokenizer, r.stop), len(ids), t0)
        return rows

    def cancel(self, index: int) -> None:
        self.batch.cancel(index)  # unknown or finished indices are ignored

    def step(self) -> list[Delta]:
        deltas = []
        events = self.batch.step()
        now = time.perf_counter()
        for ev in events:
            slot = self.slots[ev.row]
            text = ""
            reason = ev.finish_reason
            if ev.token is not None:
                slot.sampled += 1
                if slot.first_token is None:
                    slot.first_token = now
                if reason != STOP:
                    text = slot.row_text.push(ev.token)
                if slot.row_text.stopped and reason is None:
                    reason = STOP
                    self.batch.drop([ev.row])
            if reason is not None:
                text += slot.row_text.finish()
                self._complete(ev.row, slot, reason, now)
            deltas.append(Delta(ev.row, text, reason))
        return deltas

    def _complete(self, row: int, slot: _Slot, reason: str, now: float) -> None:
        rt = slot.row_text
        self.completions[row] = Completion(
            index=row, text=rt.text, token_ids=rt.ids, prompt_tokens=slot.prompt_tokens,
            completion_tokens=slot.sampled, finish_reason=reason,
            time_to_first_token=(slot.first_token or now) - slot.started, seconds=now - slot.started)
        del self.slots[row]
