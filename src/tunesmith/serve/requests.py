"""The bodies of OpenAI's generation routes, validated. An error names the field and what it must be, never the
value sent (a client's input is not echoed back)."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunesmith.serve.registry import ServeError

SEED_MAX = (1 << 62) - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's clients send fields that do not change generation

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1 << 20)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None

    def model_post_init(self, context) -> None:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 4 strings of 1 to 256 characters")
        self.stop = stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: the text ones, joined
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
                raise ValueError("messages: only text content parts are supported")
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    reasoning: Literal["on", "off"] | None = None
    """tunesmith's own: reasoning mode on or off, for templates that have one."""
    chat_template_kwargs: dict | None = None
    """``{"enable_thinking": true|false}``, as other servers take it."""

    def conversation(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def reasoning_mode(self) -> str | None:
        thinking = (self.chat_template_kwargs or {}).get("enable_thinking")
        if isinstance(thinking, bool):
            return "on" if thinking else "off"
        return self.reasoning


class CompletionBody(_Body):
    prompt: str = Field(max_length=1 << 22)


def parse_body(raw: bytes, kind: type[_Body], *, max_n: int):
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ServeError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ServeError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        body = kind.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in error.errors(include_input=False, include_url=False))
        raise ServeError(400, f"invalid request: {problems}", code="invalid_request") from None
    except ValueError as error:
        raise ServeError(400, f"invalid request: {error}", code="invalid_request") from None
    if body.n > max_n:
        raise ServeError(400, f"invalid request: n: at most {max_n}", code="invalid_request")
    return body
