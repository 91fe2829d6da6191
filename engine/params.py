"""What a generation takes: sampling parameters, hook specs and capture options.

Each rule (type, range, default) is written once, here, as a pydantic model. The engine API
validates its keyword arguments with them; control/ builds its HTTP request schemas and the
OpenAPI document from the same models, so the server and a notebook accept the same things.
Rules that depend on the loaded model (layer count, context length, vocabulary size) are
checked when a generation is planned (engine/plan.py).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import WithJsonSchema, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from engine.errors import InvalidArgument
from vocabulary import COMPONENT_NAMES, DTYPES, LAYER_NAME_PATTERN, POSITIONS

DEFAULT_MAX_TOKENS = 256

# Strict: `"5"` is not an integer and `1` is not a boolean, as in OpenAI's API.
_STRICT = ConfigDict(strict=True, extra="forbid")
_StopString = Annotated[str, Field(min_length=1)]
StopStrings = Union[_StopString, Annotated[list[_StopString], Field(max_length=16)]]


class SamplingParams(BaseModel):
    model_config = _STRICT

    max_tokens: StrictInt = Field(DEFAULT_MAX_TOKENS, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, le=100, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0, description="0 = off; at most the vocabulary size")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**64, description="mx.random.seed takes uint64 only")
    stop: Optional[StopStrings] = Field(None, description="a string or at most 16 strings that end the text")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class HookSpec(BaseModel):
    """One requested tensor: a layer name (any of the vocabulary's schemes) and a component."""

    model_config = _STRICT

    # The grammar is checked when the hook is resolved, with a message that lists the valid
    # names; the pattern is for the schema's readers (and fuzzers).
    layer_name: str = Field(min_length=1, json_schema_extra={"pattern": LAYER_NAME_PATTERN}, examples=["transformer.h.5", "blocks.3.attn.hook_pattern"])
    # Checked against the vocabulary when the hook is resolved (an UnknownHook that lists the
    # components); the enum is for the schema's readers.
    component: Optional[Annotated[str, WithJsonSchema({"type": "string", "enum": list(COMPONENT_NAMES)})]] = None
    hook_id: Optional[str] = Field(None, min_length=1, description="default: the TransformerLens name, "
                                   "or '<layer_name>.<component>'")
    capture_input: StrictBool = False
    capture_output: StrictBool = True


class CaptureOptions(BaseModel):
    model_config = _STRICT

    positions: Literal[POSITIONS] = Field("all", description="all | last (last token of each step) | prompt | "
                                          "generated")
    dtype: Literal[DTYPES] = "float32"


def parse(model: type[BaseModel], arg: str | None = None, /, **values) -> BaseModel:
    """Validate `values` as `model`, turning pydantic's error into an InvalidArgument that names
    the offending argument (prefixed with `arg`, e.g. `hooks[2]`)."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise invalid_argument(exc, arg) from None


def invalid_argument(exc: ValidationError, prefix: str | None = None) -> InvalidArgument:
    # Of a union's errors, a broken constraint says more than "wrong type" for another branch.
    errors = exc.errors(include_url=False)
    err = min(errors, key=lambda e: e["type"].endswith("_type"))
    where = argument_path(err["loc"], prefix)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] != "missing":
        given = repr(err.get("input"))
        message += f" (got {given[:80] + '...' if len(given) > 80 else given})"
    return InvalidArgument(f"'{where}': {message}" if where else message, where)


def argument_path(loc: tuple, prefix: str | None = None) -> str | None:
    """('hooks', 2, 'layer_name') -> 'hooks[2].layer_name'."""
    out = prefix or ""
    for part in loc:
        if isinstance(part, str) and not part.isidentifier():  # a union branch's tag, not a field
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None
