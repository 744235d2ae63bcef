"""The OpenAI API's requests and errors as the server reads them: each request body is checked field by field
into a frozen record, and anything wrong is an `APIError` that names the field and what it may be.

Pure (dicts in, records or `APIError` out): no web framework, tokenizer or engine is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["APIError", "ChatRequest", "CompletionRequest", "Sampling", "parse_chat", "parse_completion"]

_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request the server answers with an error: HTTP `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """How one request generates. None: not given (the server's default applies: `generation.Generations`)."""

    max_tokens: int | None
    temperature: float | None  # 0: greedy
    top_p: float | None
    top_k: int | None  # 0: no top-k filtering
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # (vLLM's extension) generate max_tokens whatever the tokens


@dataclass(frozen=True)
class CompletionRequest:
    """POST /v1/completions: a prompt as text or as token ids."""

    model: str | None
    prompt: str | list[int]
    sampling: Sampling
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    """POST /v1/chat/completions: messages as `{"role", "content"}` with text content."""

    model: str | None
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    include_usage: bool


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _int(value: Any, param: str, low: int, high: float = math.inf) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        upper = "" if high == math.inf else f" and <= {int(high)}"
        raise _bad(param, f"{value!r} is not valid: give an integer >= {low}{upper}")
    return value


def _number(value: Any, param: str, low: float, high: float, low_open: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        raise _bad(param, f"{value!r} is not valid: give a number {'>' if low_open else '>='} {low} and <= {high}")
    return float(value)


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(param, f"{value!r} is not valid: give a string")
    return value


def _bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(param, f"{value!r} is not valid: give true or false")
    return value


def _stop(value: Any, param: str) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad(param, f"{value!r} is not valid: give a non-empty string or a list of non-empty strings")
    return tuple(stops)


def _default_only(*defaults: Any) -> Callable[[Any, str], None]:
    """A field the server accepts only at its default values (anything else is refused, never ignored)."""
    def check(value: Any, param: str) -> None:
        if value not in defaults:
            raise APIError(400, f"{param}={value!r} is not supported by this server; leave it out (or give "
                           f"{defaults[0]!r})", param=param, code="unsupported_value")
    return check


def _accepted(value: Any, param: str) -> None:
    """A field with no effect on the generation (e.g. `user`): accepted as the OpenAI API does."""


# Each endpoint's fields: name -> check (returns the value to keep, or None). Any other field is refused.
_COMMON: dict[str, Callable[[Any, str], Any]] = {
    "model": lambda v, p: _str(v, p),
    "max_tokens": lambda v, p: _int(v, p, 1),
    "temperature": lambda v, p: _number(v, p, 0.0, 2.0),
    "top_p": lambda v, p: _number(v, p, 0.0, 1.0, low_open=True),
    "top_k": lambda v, p: 0 if v == -1 else _int(v, p, 0),  # (-1: none, as vLLM's)
    "stop": _stop,
    "seed": lambda v, p: _int(v, p, -(2**63), 2**64 - 1),
    "ignore_eos": _bool,
    "stream": _bool,
    "stream_options": lambda v, p: v,  # checked with `stream` (`_include_usage`)
    "n": _default_only(1),
    "presence_penalty": _default_only(0, 0.0),
    "frequency_penalty": _default_only(0, 0.0),
    "logit_bias": _default_only(None, {}),
    "user": _accepted,
}
_COMPLETION = {**_COMMON, "prompt": lambda v, p: v, "echo": _default_only(False), "best_of": _default_only(1),
               "logprobs": _default_only(None, 0), "suffix": _default_only(None, "")}
_CHAT = {**_COMMON, "messages": lambda v, p: v, "max_completion_tokens": lambda v, p: _int(v, p, 1),
         "logprobs": _default_only(False), "top_logprobs": _default_only(None, 0), "tools": _default_only(None, []),
         "tool_choice": _default_only(None, "none"), "parallel_tool_calls": _accepted,
         "response_format": _default_only(None, {"type": "text"}), "metadata": _accepted,
         "store": _default_only(False), "service_tier": _accepted}


def _fields(body: Any, spec: dict[str, Callable[[Any, str], Any]]) -> dict[str, Any]:
    """The body's fields checked by `spec` (null fields are left out, as not given)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body is a JSON {type(body).__name__}; send a JSON object")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unknown_parameter")
    return {key: spec[key](value, key) for key, value in body.items() if value is not None}


def _include_usage(fields: dict[str, Any]) -> bool:
    options = fields.get("stream_options")
    if options is None:
        return False
    if not fields.get("stream"):
        raise _bad("stream_options", "is only allowed with stream=true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", f"{options!r} is not valid: give {{\"include_usage\": true or false}}")
    return _bool(options.get("include_usage", False), "stream_options.include_usage")


def _sampling(fields: dict[str, Any], max_tokens: int | None) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=fields.get("temperature"), top_p=fields.get("top_p"),
                    top_k=fields.get("top_k"), stop=fields.get("stop", ()), seed=fields.get("seed"),
                    ignore_eos=fields.get("ignore_eos", False))


def parse_completion(body: Any) -> CompletionRequest:
    """A /v1/completions body; `max_tokens` defaults to 16, as OpenAI's."""
    fields = _fields(body, _COMPLETION)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    token_ids = isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not token_ids:
        raise APIError(400, f"prompt: {_brief(prompt)} is not valid: give one prompt, as a non-empty string or a "
                       "list of token ids (several prompts in one request are not supported: send one request each)",
                       param="prompt", code="invalid_value")
    assert isinstance(prompt, (str, list))
    return CompletionRequest(fields.get("model"), prompt, _sampling(fields, fields.get("max_tokens", 16)),
                             fields.get("stream", False), _include_usage(fields))


def parse_chat(body: Any) -> ChatRequest:
    """A /v1/chat/completions body; without `max_completion_tokens` or `max_tokens` a reply may fill the context."""
    fields = _fields(body, _CHAT)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: give a non-empty list of {\"role\", \"content\"} objects", param="messages",
                       code="invalid_value")
    max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens"))
    return ChatRequest(fields.get("model"), [_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
                       _sampling(fields, max_tokens), fields.get("stream", False), _include_usage(fields))


def _message(message: Any, param: str) -> dict[str, str]:
    """One chat message as the chat template takes it: its role and its text (text parts joined)."""
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise APIError(400, f"{param}: {_brief(message)} is not a message: give {{\"role\": one of {list(_ROLES)}, "
                       "\"content\": text}", param=param, code="invalid_value")
    extra = sorted(set(message) - {"role", "content", "name"})
    if extra:
        raise APIError(400, f"{param}.{extra[0]} is not supported by this server (text messages only)",
                       param=f"{param}.{extra[0]}", code="unsupported_value")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"{param}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                           "supported by this server", param=f"{param}.content", code="unsupported_value")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{param}.content: {_brief(content)} is not valid: give the message's text",
                       param=f"{param}.content", code="invalid_value")
    return {"role": message["role"], "content": content}


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
