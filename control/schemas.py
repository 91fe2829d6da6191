"""The request bodies of every endpoint, declared once.

Validation (`parse_body`) and the OpenAPI document (control/openapi.py) both come from these
models. Sampling fields, hook specs and capture options are the engine's own models
(engine/params.py), so a rule is written in one place; here they only become nullable, since
OpenAI's API takes `null` for "the default".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, create_model

from control.errors import InvalidRequest, MalformedRequest
from engine.params import HookSpec, SamplingParams, invalid_argument
from vocabulary import DTYPES, ENCODINGS, POSITIONS, TRANSPORTS

# Strict types (no "5" for 5); unknown fields are ignored, as OpenAI-compatible servers do.
_OPEN = ConfigDict(strict=True, extra="allow")
_CLOSED = ConfigDict(strict=True, extra="forbid")


class TextPart(BaseModel):
    model_config = _OPEN
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _OPEN
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart]] = Field(description="text, or OpenAI content parts of type 'text'")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = _OPEN
    include_usage: StrictBool = False


def _nullable(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s fields with the same rules, each also accepting null (= the default)."""
    fields = {}
    for name, f in model.model_fields.items():
        t = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[name] = (Optional[t], Field(None, description=f.description))
    return fields


ChatRequest = create_model(
    "ChatRequest",
    __config__=_OPEN,
    __doc__="OpenAI chat completions request (fields this server does not use are ignored).",
    model=(Optional[str], None),
    messages=(Annotated[list[Message], Field(min_length=1)], ...),
    max_completion_tokens=(Optional[Annotated[int, Field(ge=1)]], Field(None, description="alias of max_tokens")),
    n=(Optional[Literal[1]], Field(None, description="only 1 is supported")),
    stream=(StrictBool, False),
    stream_options=(Optional[StreamOptions], None),
    **_nullable(SamplingParams),
)


class ActivationChatRequest(ChatRequest):
    """A chat request plus the activations to capture."""

    activation_hooks: Optional[list[HookSpec]] = Field(
        None, description="tensors to capture; default: the hooks registered with POST /v1/activations/hooks")
    activations_transport: Literal[TRANSPORTS] = "inline"
    activations_encoding: Literal[ENCODINGS] = "json"
    activation_positions: Optional[Literal[POSITIONS]] = None
    activation_dtype: Optional[Literal[DTYPES]] = None


class LoadModelRequest(BaseModel):
    model_config = _CLOSED
    model_path: str = Field(pattern=r"^[^\x00]*[^\s\x00][^\x00]*$", description='a model folder, a .gguf file, or "default"')
    model_id: Optional[str] = None


class RegisterHooksRequest(BaseModel):
    model_config = _CLOSED
    hooks: list[HookSpec]


def sampling_values(body: BaseModel) -> dict[str, Any]:
    """The request's sampling fields that were given (not null), as engine keyword arguments."""
    values = {name: getattr(body, name) for name in SamplingParams.model_fields}
    if values["max_tokens"] is None:
        values["max_tokens"] = body.max_completion_tokens
    return {k: v for k, v in values.items() if v is not None}


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """Validate a request body; a bad one is a 400 naming the field, as OpenAI answers."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = invalid_argument(exc)
        raise InvalidRequest(err.message, err.arg) from None
