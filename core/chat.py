"""A conversation with a distributed model, kept in one inference session.

`ChatSession` renders the conversation with the tokenizer's chat template (or a plain `User:`/`Assistant:` layout
when it has none), sends only what the servers do not hold yet, and streams decoded text as tokens arrive. The token
ids the servers hold are kept exactly (never re-tokenized), so each turn extends the same attention cache. A turn that
does not complete (Ctrl-C, an error) is dropped, here and on the servers (the session rewinds to where it began).
`printable` is what of a model's text may reach a terminal; `render_chat` and `encode_chat` turn messages into the
token ids a model is prompted with (the OpenAI-compatible API prompts the same way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..transport.discovery import Discovery
from ..transport.errors import ConfigError
from .aliases import resolve_alias
from .client.config import ClientConfig
from .client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from .weights import ModelSource

log = logging.getLogger(__name__)


class TextStream(BaseStreamer):
    """Calls `on_text` with each new piece of decoded text (holding back incomplete UTF-8 sequences)."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def _emit(self, text: str) -> None:
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))


class ChatSession:
    def __init__(self, model: DistributedModelForCausalLM, tokenizer: Any, *, system: str | None = None,
                 max_length: int = 2048, max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.9,
                 seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length = min(max_length, int(getattr(model.config, "max_position_embeddings", max_length)))
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.generator_seed = seed
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.ids: list[int] = []  # token ids the servers hold (or will, with the next step)
        self._session_cm: Any = None
        self._undo_to: tuple[int, list[dict[str, str]], list[int]] = (0, [], [])  # state before the current turn

    @classmethod
    def connect(cls, model_name: str, peers: list[str], config: ClientConfig | None = None,
                discovery: Discovery | None = None, mdns: bool | None = None, prompts: str | None = None,
                adapter: str | None = None, device: str = "cpu", **kwargs: Any) -> ChatSession:
        """Connect to the swarm serving `model_name`; `prompts` is a tuning result (`swarm tune --task lm`), `adapter`
        the name of an adapter the servers serve, `device` where the client's embeddings and head run."""
        model = AutoDistributedModelForCausalLM.from_pretrained(model_name, initial_peers=peers, config=config,
                                                                discovery=discovery, mdns=mdns, prompts=prompts,
                                                                adapter=adapter, device=device)
        try:
            tokenizer = ModelSource(resolve_alias(model_name)).tokenizer()
        except ConfigError:
            model.blocks.close()
            raise
        return cls(model, tokenizer, **kwargs)

    def __enter__(self) -> ChatSession:
        self._open()
        if self.generator_seed is not None:
            torch.manual_seed(self.generator_seed)
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        self.model.blocks.close()

    def _open(self) -> None:
        self._session_cm = self.model.inference_session(max_length=self.max_length)
        self._session_cm.__enter__()
        self.ids = []

    def _close(self) -> None:
        if self._session_cm is not None:
            self._session_cm.__exit__(None, None, None)
            self._session_cm = None

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return render_chat(self.tokenizer, messages, add_generation_prompt)

    def _encode(self, text: str, first: bool) -> list[int]:
        return encode_chat(self.tokenizer, text, first)

    def _next_input(self, user_text: str) -> list[int]:
        before = self._render(self.messages, add_generation_prompt=False) if self.messages else ""
        self.messages.append({"role": "user", "content": user_text})
        after = self._render(self.messages, add_generation_prompt=True)
        if not self.ids or not after.startswith(before):
            return self._encode(after, first=True)
        delta = self._encode(after[len(before):], first=False)
        eos = self.tokenizer.eos_token_id
        if self.ids and self.ids[-1] == eos and delta and delta[0] == eos:
            delta = delta[1:]  # the model already produced the end-of-turn token the template adds
        return self.ids + delta

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the answer (streamed to `on_text`), and return it.

        When the answer does not complete (Ctrl-C, which may come from `on_text`, or an error), the turn is dropped:
        the conversation, here and in the servers' caches, is as it was before this message, and the exception
        goes on to the caller, who may send the next message.
        """
        self._undo_to = (self._position(), list(self.messages), list(self.ids))
        try:
            return self._send(text, on_text)
        except BaseException:
            self._undo(*self._undo_to)
            raise

    def _send(self, text: str, on_text: Callable[[str], None] | None) -> str:
        ids = self._next_input(text)
        if len(ids) + self.max_new_tokens > self.max_length:
            log.warning("the conversation is full (--max-length %d); starting a new one", self.max_length)
            self._close()
            self._open()
            self.messages = [m for m in self.messages if m["role"] == "system"] + [self.messages[-1]]
            self._undo_to = (0, self.messages[:-1], [])
            ids = self._encode(self._render(self.messages, add_generation_prompt=True), first=True)
            if len(ids) + self.max_new_tokens > self.max_length:
                raise ConfigError(f"the message is too long for --max-length {self.max_length}")
        stream = TextStream(self.tokenizer, on_text or (lambda _: None))
        sampling: dict[str, Any] = ({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
                                    if self.temperature > 0 else {"do_sample": False})
        input_ids = torch.tensor([ids], device=self.model.device)
        out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=self.max_new_tokens, streamer=stream,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                  **sampling)
        new = out[0, len(ids):].tolist()
        self.ids = ids + new
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _position(self) -> int:
        session = self.model.active_session
        return 0 if session is None else session.position

    def _undo(self, position: int, messages: list[dict[str, str]], ids: list[int]) -> None:
        """Back to the end of the last complete turn: the servers' caches too (the next step starts there)."""
        self.messages, self.ids = messages, ids
        session = self.model.active_session
        if session is None or session.closed:
            return
        try:
            session.rewind(position)
        except ConfigError as e:  # not where a step began (cannot happen in a chat): start over, cleanly
            log.warning("cannot go back to the end of the last answer (%s); starting a new conversation", e)
            self._close()
            self._open()
            self.messages = [m for m in messages if m["role"] == "system"]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """`messages` as the model reads them: the tokenizer's chat template, or `Role: text` lines when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


def encode_chat(tokenizer: Any, text: str, first: bool = True) -> list[int]:
    """Token ids of rendered chat `text`; the tokenizer's special tokens (BOS) go in front of the `first` part of a
    conversation only when there is no chat template (a template writes its own)."""
    return tokenizer(text, add_special_tokens=first and not getattr(tokenizer, "chat_template", None))["input_ids"]


_CONTROL_OK = "\n\t\u200c\u200d"  # newline, tab, and the zero-width (non-)joiners emoji and some scripts need


def printable(text: str) -> str:
    """`text` without control and format characters (escape sequences, bells, carriage returns, bidi overrides...)
    but with newlines and tabs, for printing a model's output to a terminal."""
    return "".join(ch for ch in text if ch.isprintable() or ch in _CONTROL_OK)
