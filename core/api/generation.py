"""One request's answer: generated on a worker thread, in an inference session of its own.

`Generation.run()` (blocking: call it on a worker thread) generates through a `shared_view` of the model's client, so
concurrent requests each hold their own session and the servers batch their steps together; a server failing
mid-answer is recovered underneath by the session (replay), and the answer goes on with the same tokens. Greedy
(temperature 0) is transformers' greedy search with the same prompt as `ChatSession`, so the text is the same as
`swarm chat --prompt`'s. Sampling draws from a generator of the request's own (`seed`), so concurrent requests do
not share one random stream. Text is decoded as tokens come and handed to `on_text` in pieces, holding back
incomplete UTF-8 and any tail that may be the start of a stop string; a stop string ends its choice, and the text
stops before it. `cancel()` (a client gone) ends the generation at the next token and closes its session.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TopPLogitsWarper

from .models import Loaded
from .protocol import Sampling

log = logging.getLogger(__name__)

OnText = Callable[[int, str], None]  # (choice index, new text)
OnFinish = Callable[[int, str], None]  # (choice index, finish reason)


@dataclass
class Choice:
    """What one choice has produced so far."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""  # its text so far (before any stop string)
    sent: int = 0  # characters of `text` handed out
    reason: str | None = None  # "stop" or "length" once finished


@dataclass(frozen=True)
class Result:
    texts: list[str]
    reasons: list[str]
    prompt_tokens: int
    completion_tokens: int


class _Sampler(LogitsProcessor):
    """Samples the next token itself (temperature, top-p) from its own generator and leaves only that token possible,
    so transformers' greedy search takes it."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.seed = secrets.randbits(63) if seed is None else seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class _Watch(StoppingCriteria):
    """Called by generate() after every token: records each choice's tokens and text, hands out new text, and says
    which choices are done (end of sequence, a stop string, their token budget, or the request cancelled)."""

    def __init__(self, gen: Generation, prompt_length: int):
        self.gen, self.prompt_length = gen, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, choice in enumerate(self.gen.choices):
            if choice.reason is None:
                self.gen.advance(i, int(last[i]))
        done = [c.reason is not None or self.gen.cancelled.is_set() for c in self.gen.choices]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Generation:
    def __init__(self, loaded: Loaded, adapter: str | None, prompt: list[int], sampling: Sampling,
                 max_tokens: int, on_text: OnText | None = None, on_finish: OnFinish | None = None):
        self.loaded, self.adapter, self.prompt, self.sampling = loaded, adapter, prompt, sampling
        self.max_tokens = max_tokens
        self.on_text, self.on_finish = on_text or (lambda i, t: None), on_finish or (lambda i, r: None)
        self.choices = [Choice() for _ in range(sampling.n)]
        self.cancelled = threading.Event()
        self.first_token: float | None = None  # time.monotonic() when the first token came
        tokenizer = loaded.tokenizer
        eos = loaded.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self) -> Result:
        """Generate the answer (blocking); every choice is finished when it returns."""
        tokenizer, n = self.loaded.tokenizer, self.sampling.n
        view = self.loaded.model.shared_view()
        view.set_adapter(self.adapter)
        ids = torch.tensor([self.prompt] * n, device=view.device)
        sampling = self.sampling
        processors = LogitsProcessorList([_Sampler(sampling.temperature, sampling.top_p, sampling.seed)]
                                         if sampling.temperature > 0 else [])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        view.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_tokens, do_sample=False,
                      num_beams=1, logits_processor=processors, pad_token_id=pad,
                      stopping_criteria=StoppingCriteriaList([_Watch(self, len(self.prompt))]))
        for i, choice in enumerate(self.choices):  # e.g. cancelled, or stopped by generate() itself
            if choice.reason is None:
                self._finish(i, "length")
        return Result([c.text for c in self.choices], [str(c.reason) for c in self.choices], len(self.prompt),
                      sum(len(c.tokens) for c in self.choices))

    def advance(self, i: int, token: int) -> None:
        """Choice `i` got `token`: note it, hand out what text is now certain, finish it when it is done."""
        choice = self.choices[i]
        if self.first_token is None:
            self.first_token = time.monotonic()
        choice.tokens.append(token)
        text = self.loaded.tokenizer.decode(choice.tokens, skip_special_tokens=True)
        at = _first_stop(text, self.sampling.stop)
        if at is not None:
            choice.text = text[:at]
            self._finish(i, "stop")
        elif token in self.eos:
            choice.text = text
            self._finish(i, "stop")
        elif len(choice.tokens) >= self.max_tokens:
            choice.text = text
            self._finish(i, "length")
        else:
            choice.text = text
            self._send(i, _certain(text, self.sampling.stop))

    def _send(self, i: int, upto: int) -> None:
        choice = self.choices[i]
        if upto > choice.sent:
            piece, choice.sent = choice.text[choice.sent:upto], upto
            self.on_text(i, piece)

    def _finish(self, i: int, reason: str) -> None:
        choice = self.choices[i]
        choice.reason = reason
        self._send(i, len(choice.text))
        self.on_finish(i, reason)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins (None: none is there)."""
    found = [at for s in stops if (at := text.find(s)) >= 0]
    return min(found) if found else None


def _certain(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` will stay as it is whatever comes next: not an incomplete character at its end, nor a tail
    that may begin a stop string."""
    end = len(text)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence, decoded as a placeholder
        end = len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text[:end].endswith(stop[:k]):
                hold = k
                break
    return end - hold
