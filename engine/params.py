"""What a generation takes: sampling parameters, hook specs and capture options.

Each rule (type, range, default) is written once, here, as a pydantic model. The engine API
validates its keyword arguments with them; control/ builds its HTTP request schemas and the
OpenAPI document from the same models, so the server and a notebook accept the same things.
Rules that depend on the loaded model (layer count, context length, vocabulary size) are
checked when a generation is planned (engine/plan.py).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import (WithJsonSchema, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      ValidationInfo, field_validator)

from engine.errors import InvalidArgument
from vocabulary import (COMPONENT_NAMES, DTYPES, INTERVENTION_OPS, INTERVENTION_POSITIONS, LAYER_NAME_PATTERN,
                        POSITIONS)

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


class LogprobOptions(BaseModel):
    """Log-probabilities to report at every generated step, as OpenAI's `logprobs` and
    `top_logprobs`, plus `token_ids`: fixed tokens whose log-probabilities are reported at every
    step whatever was sampled (what logit-difference metrics need). `logprobs` or `token_ids`
    turns reporting on; `top_logprobs` needs `logprobs`, as in OpenAI's API."""

    model_config = _STRICT

    logprobs: StrictBool = Field(False, description="report the log-probability of each generated token (the "
                                 "model's distribution, before temperature, top_k and top_p)")
    top_logprobs: StrictInt = Field(0, ge=0, le=20, description="also the most likely tokens at each step, "
                                    "at most 20; needs logprobs true")
    token_ids: list[Annotated[StrictInt, Field(ge=0)]] = Field(
        default_factory=list, max_length=64, description="token ids (below the model's vocab_size) whose "
        "log-probabilities are reported at every generated step, whatever is sampled; at most 64")

    # A field validator, not a model validator: the error then names `top_logprobs` (a model
    # validator's error names no field).
    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int, info: ValidationInfo) -> int:
        if top > 0 and info.data.get("logprobs") is False:  # absent: logprobs itself was invalid
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @property
    def wanted(self) -> bool:
        """Whether any per-step log-probability is reported."""
        return self.logprobs or bool(self.token_ids)


# The grammar is checked when a name is resolved, with a message that lists the valid names;
# the pattern and the enum are for the schema's readers (and fuzzers).
LayerName = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": LAYER_NAME_PATTERN},
                                 examples=["transformer.h.5", "blocks.3.attn.hook_pattern"])]
ComponentName = Optional[Annotated[str, WithJsonSchema({"type": "string", "enum": list(COMPONENT_NAMES)})]]
_Index = Annotated[StrictInt, Field(ge=0)]
Indices = Optional[Annotated[list[_Index], Field(min_length=1)]]


class HookSpec(BaseModel):
    """One requested tensor: a layer name (any of the vocabulary's schemes) and a component."""

    model_config = _STRICT

    layer_name: LayerName
    component: ComponentName = None
    hook_id: Optional[str] = Field(None, min_length=1, description="default: the TransformerLens name, "
                                   "or '<layer_name>.<component>'")
    capture_input: StrictBool = False
    capture_output: StrictBool = True


class PatchSource(BaseModel):
    """A tensor captured by an earlier request and kept on the server (shared-memory transport)."""

    model_config = _STRICT

    capture_id: str = Field(min_length=1)
    hook_id: str = Field(min_length=1)


class InterventionSpec(BaseModel):
    """One change to one tensor, on the prompt and on every generated token.

    Which fields an op takes (coefficient for scale/add/project_out, a vector for add/set/
    project_out, min/max for clamp, source for patch) is checked when the intervention is
    resolved on the model (engine/interventions.py), with the model's sizes in the message."""

    model_config = _STRICT

    layer_name: LayerName
    component: ComponentName = None
    op: Literal[INTERVENTION_OPS]
    coefficient: Optional[float] = Field(None, description="scale: the factor; add: multiplies the vector "
                                         "(default 1); project_out: how much of the projection to remove "
                                         "(default 1)")
    vector: Optional[Union[list[float], list[list[float]]]] = Field(
        None, description="[n] for the last axis (or the chosen indices), or [heads, n] for per-head sites")
    vector_id: Optional[str] = Field(None, min_length=1, description="a vector stored with POST /v1/vectors")
    min: Optional[float] = None
    max: Optional[float] = None
    positions: Union[Literal[INTERVENTION_POSITIONS], Annotated[list[_Index], Field(min_length=1)]] = Field(
        "all", description="all | prompt | generated | absolute token positions")
    heads: Indices = Field(None, description="heads to change (per-head sites); default all")
    indices: Indices = Field(None, description="indices of the last axis to change (e.g. neurons); default all")
    source: Optional[PatchSource] = Field(None, description="patch: the captured tensor to copy in")


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


def parse_list(model: type[BaseModel], values, arg: str, fields: str) -> list:
    """A list of `model`s from models or plain dicts, each validated; errors name `arg[i].field`.
    `fields` shows the caller what one item looks like (e.g. "layer_name, component, ...")."""
    if isinstance(values, (str, bytes, dict, BaseModel)) or not hasattr(values, "__iter__"):
        raise InvalidArgument(f"{arg} must be a list of objects ({{{fields}}})", arg)
    out = []
    for i, v in enumerate(values):
        if isinstance(v, model):
            out.append(v)
        elif isinstance(v, dict):
            out.append(parse(model, f"{arg}[{i}]", **v))
        else:
            raise InvalidArgument(f"{arg}[{i}] must be an object ({{{fields}}}), not {v!r}", f"{arg}[{i}]")
    return out


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
