"""OpenAI request bodies checked into typed requests, and the bodies of the answers.

Every field of a request is either used, or refused with an `ApiError` (HTTP 400 and OpenAI's error object): a field
this API does not implement is accepted only with the value that changes nothing (`null`, `false`, `0`, `{}`, `[]`,
`n: 1`...), so no request is answered as if a setting it asked for had been applied. Values are bounded
(`ApiConfig`). The answer bodies (`chat_body`, `chat_chunk`, `completion_body`, ...) follow OpenAI's shapes.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .config import ApiConfig

MAX_SEED = (1 << 63) - 1
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """How to generate: the same for both endpoints."""

    max_tokens: int | None  # None: as many as the context and `ApiConfig.max_tokens` allow
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1


@dataclass(frozen=True)
class Request:
    """A checked request: chat `messages` or a completion `prompt` (text or token ids)."""

    model: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    messages: tuple[dict[str, str], ...] = ()
    prompt: str | tuple[int, ...] | None = None

    @property
    def chat(self) -> bool:
        return self.prompt is None


# fields this API does not implement, with the values that change nothing (any of them is accepted)
NO_OP: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"), "store": (None, False), "metadata": (None, {}),
    "web_search_options": (None,), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}
IGNORABLE = ("user",)  # an end-user id for the provider's records: nothing to apply
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "n", "stream", "stream_options", "response_format")
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
                     "stream_options")


def parse_chat(body: Any, config: ApiConfig) -> Request:
    """A `POST /v1/chat/completions` body as a `Request`; ApiError when it is not one this API serves."""
    fields = _fields(body, CHAT_FIELDS)
    fmt = fields.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _unsupported("response_format", "only response_format {\"type\": \"text\"} is supported")
    max_tokens = _first(fields, "max_completion_tokens", "max_tokens")
    messages = _messages(fields.get("messages"), config)
    return Request(_model(fields), _sampling(fields, max_tokens, config), *_stream(fields), messages=messages)


def parse_completion(body: Any, config: ApiConfig) -> Request:
    """A `POST /v1/completions` body as a `Request`; ApiError when it is not one this API serves."""
    fields = _fields(body, COMPLETION_FIELDS)
    prompt = _prompt(fields.get("prompt"))
    return Request(_model(fields), _sampling(fields, "max_tokens", config), *_stream(fields), prompt=prompt)


def _fields(body: Any, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    for name, value in body.items():
        if name in known or name in IGNORABLE:
            continue
        if name in NO_OP:
            if not any(value == ok and type(value) is type(ok) for ok in NO_OP[name]):
                raise _unsupported(name, f"{name} is not supported by this server")
            continue
        raise ApiError(f"unknown field {name!r}", param=name, code="unknown_field")
    return {k: v for k, v in body.items() if k in known and v is not None}


def _unsupported(param: str, message: str) -> ApiError:
    return ApiError(message, param=param, code="unsupported_parameter")


def _first(fields: dict[str, Any], *names: str) -> str:
    """The first of `names` the request sets (the name to read `max_tokens` from)."""
    return next((name for name in names if name in fields), names[-1])


def _model(fields: dict[str, Any]) -> str:
    model = fields.get("model")
    if not isinstance(model, str) or not model or len(model) > 1024:
        raise ApiError("model must be the id of a model this server offers (see /v1/models)", param="model")
    return model


def _number(fields: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ApiError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", param=name)
    return float(value)


def _integer(fields: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)
    return value


def _sampling(fields: dict[str, Any], max_tokens_name: str, config: ApiConfig) -> Sampling:
    top_p = _number(fields, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise ApiError("top_p must be greater than 0", param="top_p")
    stop = fields.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > config.max_stop or any(len(s) > config.max_stop_chars for s in stop):
        raise ApiError(f"stop must be a non-empty string or a list of at most {config.max_stop} of them, each at "
                       f"most {config.max_stop_chars} characters", param="stop")
    return Sampling(max_tokens=_integer(fields, max_tokens_name, 1, config.max_tokens),
                    temperature=_number(fields, "temperature", 1.0, 0.0, 2.0), top_p=top_p,
                    seed=_integer(fields, "seed", -MAX_SEED, MAX_SEED), stop=tuple(stop),
                    n=_integer(fields, "n", 1, config.max_n) or 1)


def _stream(fields: dict[str, Any]) -> tuple[bool, bool]:
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false", param="stream")
    options = fields.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise ApiError("stream_options may only hold include_usage (true or false)", param="stream_options")
    if options and not stream:
        raise ApiError("stream_options needs stream: true", param="stream_options")
    return stream, bool(options.get("include_usage", False))


def _messages(value: Any, config: ApiConfig) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value or len(value) > config.max_messages:
        raise ApiError(f"messages must be a list of 1 to {config.max_messages} messages", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise ApiError(f"{where} must be an object with a role and a content only (names, tool calls and "
                           "refusals are not supported)", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message.get("content"), f"{where}.content")})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (other parts, such as images, are refused)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                       and isinstance(p["text"], str) for p in value):
        return "".join(p["text"] for p in value)
    raise ApiError(f"{where} must be a string or a list of text parts (images, audio and files are not supported)",
                   param=where)


def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in value):
        return tuple(value)
    raise ApiError("prompt must be a string or a list of token ids (one prompt per request)", param="prompt")


# --- answers ---------------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(rid: str, model: str, texts: list[str], reasons: list[str], use: dict[str, int]) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def completion_body(rid: str, model: str, texts: list[str], reasons: list[str],
                    use: dict[str, int]) -> dict[str, Any]:
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
               for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chunk(request: Request, rid: str, model: str, index: int | None, text: str | None = None,
          reason: str | None = None, role: bool = False, use: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed piece: text of choice `index` (the role first, in a chat), its finish reason, or (with no index)
    the usage."""
    choices: list[dict[str, Any]] = []
    if index is not None:
        if request.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}]
    body = {"id": rid, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if request.include_usage:
        body["usage"] = use
    return body
