"""The request bodies of every endpoint, declared once.

Validation (`parse_body`) and the OpenAPI document (control/openapi.py) both come from these
models. Sampling fields, log-probability options, hook specs and capture options are the
engine's own models (engine/params.py), so a rule is written in one place; here they only
become nullable, since OpenAI's API takes `null` for "the default".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, create_model

from control.errors import InvalidRequest, MalformedRequest
from engine.attribution import METHODS, LogitDiffMetric, LogprobMetric
from engine.params import HookSpec, InterventionSpec, LogprobOptions, SamplingParams, invalid_argument
from vocabulary import DTYPES, ENCODINGS, INTERVENTION_POSITIONS, POSITIONS, TRANSPORTS

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


# LogprobOptions field -> request field, where OpenAI's API has no name of its own for it.
LOGPROB_FIELDS = {"logprobs": "logprobs", "top_logprobs": "top_logprobs", "token_ids": "logprob_token_ids"}


def _nullable(model: type[BaseModel], names: dict[str, str] | None = None) -> dict[str, Any]:
    """`model`'s fields with the same rules, each also accepting null (= the default); `names`
    renames them (model field -> request field)."""
    fields = {}
    for name, f in model.model_fields.items():
        t = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[names[name] if names else name] = (Optional[t], Field(None, description=f.description))
    return fields


ChatRequest = create_model(
    "ChatRequest",
    __config__=_OPEN,
    __doc__="OpenAI chat completions request (fields this server does not use are ignored).",
    model=(Optional[str], None),
    messages=(Optional[Annotated[list[Message], Field(min_length=1)]], Field(
        None, description="the chat (required unless `prompt` is given)")),
    prompt=(Optional[Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[int, Field(ge=0)]],
                                                                           Field(min_length=1)]]], Field(
        None, description="extension: raw text (or token ids) to continue without the chat template, instead of "
                          "`messages`; what interpretability prompts such as indirect-object identification need")),
    max_completion_tokens=(Optional[Annotated[int, Field(ge=1)]], Field(None, description="alias of max_tokens")),
    n=(Optional[Literal[1]], Field(None, description="only 1 is supported")),
    stream=(StrictBool, False),
    stream_options=(Optional[StreamOptions], None),
    **_nullable(SamplingParams),
    **_nullable(LogprobOptions, LOGPROB_FIELDS),
    interventions=(Optional[Annotated[list[InterventionSpec], Field(max_length=1024)]], Field(
        None, description="changes to tensors on the prompt and every generated token, applied in order "
                          "(docs/interventions.md)")),
    baseline=(StrictBool, Field(False, description="also return the completion without interventions (same "
                                                   "sampling and seed) as `baseline`")),
)


class ActivationChatRequest(ChatRequest):
    """A chat request plus the activations to capture."""

    activation_hooks: Optional[list[HookSpec]] = Field(
        None, description="tensors to capture; default: the hooks registered with POST /v1/activations/hooks")
    activations_transport: Literal[TRANSPORTS] = "inline"
    activations_encoding: Literal[ENCODINGS] = "json"
    activation_positions: Optional[Literal[POSITIONS]] = None
    activation_dtype: Optional[Literal[DTYPES]] = None


class AttributionPrompt(BaseModel):
    """One run of an attribution: a chat (`messages`, with the model's chat template) or raw `prompt`."""

    model_config = _CLOSED
    messages: Optional[Annotated[list[Message], Field(min_length=1)]] = None
    prompt: Optional[Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[int, Field(ge=0)]],
                                                                          Field(min_length=1)]]] = Field(
        None, description="raw text (or token ids), without the chat template")

    def engine_value(self) -> dict:
        if self.messages is not None:
            return {"messages": [m.model_dump() for m in self.messages], "prompt": self.prompt}
        return {"prompt": self.prompt}


class AttributionRequest(BaseModel):
    """Attribution patching (docs/attribution.md): every site's effect on a metric, estimated from one
    backward pass at the corrupted run, optionally checked against real activation patching."""

    model_config = _CLOSED
    model: Optional[str] = None
    clean: AttributionPrompt
    corrupted: AttributionPrompt = Field(description="same token count as `clean`")
    metric: Annotated[Union[LogitDiffMetric, LogprobMetric], Field(discriminator="type")]
    sites: Optional[Annotated[list[HookSpec], Field(min_length=1, max_length=1024)]] = Field(
        None, description="hook specs (layer_name, component); default: every layer's attention, mlp and residual "
                          "output")
    method: Literal[METHODS] = Field("atp", description="atp: the gradient estimate; atp*: AtP* (Kramar et al. 2024): "
                                                      "the QK fix for query and key sites, and a GradDrop score per row")
    verify_top: Optional[Annotated[int, Field(ge=0, le=256)]] = Field(
        None, description="also patch the K sites and positions with the largest |estimate| (atp*: GradDrop score) "
                           "for real; a server time limit skips those not started in time")


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


def logprob_values(body: BaseModel) -> dict[str, Any]:
    """The request's log-probability fields, as LogprobOptions' keyword arguments (null: the default)."""
    return {name: getattr(body, field) for name, field in LOGPROB_FIELDS.items()}


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


class VectorFromCapture(BaseModel):
    model_config = _CLOSED
    capture_id: str = Field(min_length=1, description="a live capture (activations_transport 'shm')")
    hook_id: str = Field(min_length=1, description="its column: the hook_id, or '<id>:input'")
    reduce: Literal["mean", "last"] = Field("mean", description="mean over the positions, or the last of them")
    positions: Union[Literal[INTERVENTION_POSITIONS], Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] = "all"


class CreateVectorRequest(BaseModel):
    """Exactly one of `vector`, `data` (+ `dtype`), `from_capture` or `controlvector`."""

    model_config = _CLOSED
    name: Optional[str] = Field(None, max_length=200)
    vector: Optional[Union[list[float], list[list[float]]]] = Field(None, description="[n] or [heads, n]")
    data: Optional[str] = Field(None, description="base64 of the values, little-endian, in `dtype`")
    dtype: Optional[Literal[DTYPES]] = None
    shape: Optional[Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=2)]] = None
    layer: Optional[Annotated[int, Field(ge=0)]] = Field(None, description="the layer it was made for (a label)")
    from_capture: Optional[VectorFromCapture] = None
    controlvector: Optional[str] = Field(None, description="base64 of a llama.cpp control-vector GGUF: one vector "
                                         "per layer (direction.N steers the residual stream after layer N)")

    def source(self) -> str:
        given = [f for f in ("vector", "data", "from_capture", "controlvector") if getattr(self, f) is not None]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of 'vector' (numbers), 'data' (base64, with 'dtype'), "
                                 f"'from_capture' or 'controlvector' (got {', '.join(given) or 'none'})",
                                 given[1] if len(given) > 1 else "vector")
        if given[0] == "data" and self.dtype is None:
            raise InvalidRequest("'data' needs a 'dtype': float32, float16 or bfloat16", "dtype")
        return given[0]


class LogitLensRequest(BaseModel):
    """The logit lens of a live capture (docs/viz.md): each captured residual-stream output read through the
    final norm and the unembedding; only the top-k tokens and probabilities come back."""

    model_config = _CLOSED
    top_k: Annotated[int, Field(ge=1, le=100)] = Field(5, description="tokens per layer and position")
    layers: Optional[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1024)]] = Field(
        None, description="layers whose residual output the capture holds; default: all of them")
    positions: Optional[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] = Field(
        None, description="token positions; default: every captured row")


class HarvestDocument(BaseModel):
    """One document: raw `text`, or a chat (`messages`, rendered with the model's chat template)."""

    model_config = _CLOSED
    text: Optional[str] = None
    messages: Optional[Annotated[list[Message], Field(min_length=1)]] = None


class HarvestRequest(BaseModel):
    """A harvest job (docs/harvest.md): activations of every token of the documents into Parquet
    shards in a server-owned directory. Exactly one of `input_path` or `documents`."""

    model_config = _CLOSED
    hooks: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=4096)] = Field(
        description="TransformerLens names (blocks.3.hook_resid_post) or layer_name:component; each names a column")
    input_path: Optional[str] = Field(None, pattern=r"^[^\x00]+$", description="a .jsonl or .parquet file on the "
                                      "server, under a directory clients may load models from")
    documents: Optional[Annotated[list[HarvestDocument], Field(min_length=1)]] = None
    context: Optional[Annotated[int, Field(ge=1)]] = Field(None, description="tokens per document at most "
                                                           "(default: 1024 or the model's context, if smaller)")
    truncate: StrictBool = Field(False, description="cut documents longer than `context` (otherwise an error)")
    dtype: Literal["float32", "float16"] = "float32"
    shard_rows: Annotated[int, Field(ge=1)] = Field(65536, description="rows (tokens) per shard at most")
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = Field(None, description="stop after this many tokens")
    shuffle: Optional[Annotated[int, Field(ge=0)]] = Field(None, description="seed: rows permuted across all shards")
    batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="documents per forward at most")
    batch_tokens: Annotated[int, Field(ge=1)] = Field(4096, description="padded tokens per forward at most")
