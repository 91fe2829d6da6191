"""The Python client of the activation server (the original design's `LMStudioNeuroScopeClient`).

    client = LMStudioNeuroScopeClient("http://127.0.0.1:8080")
    result = client.generate_with_activations(
        [{"role": "user", "content": "Hello"}],
        [{"layer_name": "transformer.h.5", "component": "residual"}],
        max_tokens=20, temperature=0.0)
    result["activations"]["transformer.h.5.residual"]      # the server's entries, unchanged
    result.text, result.tokens, result.arrays("transformer.h.5.residual")  # per-step numpy arrays

    # Same host: the arrays alias the server's shared memory (no copy, no JSON).
    with client.generate_with_activations(msgs, hooks, transport="shm") as cap:
        resid = cap.arrays["transformer.h.5.residual"]     # np.ndarray [rows, d_model]
    # leaving the block unmaps the segment and tells the server to release it

    # Streaming: text deltas and each step's activations as they arrive.
    for event in client.generate_with_activations(msgs, hooks, stream=True):
        print(event.text, event.steps)

    # Raw text (or token ids) continued without the chat template: prompt= instead of messages.
    client.chat(prompt="When Mary and John went to the store, John gave a drink to", max_tokens=1)

    # Attribution patching: every site's estimated effect, as numpy columns (docs/attribution.md).
    r = client.attribution(clean_text, corrupted_text, (target_id, foil_id), method="atp*", verify_top=5)
    names, grid = r.matrix("residual")                     # [sites, positions]

Every non-2xx answer (and every error event inside a stream) raises `NeuroScopeServerError`
with the server's status, message, type, param and code. Network failures raise
`NeuroScopeConnectionError`. Both derive from `NeuroScopeError`.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import requests

from shm.format import bfloat16_to_float32

try:  # orjson is a server dependency; parse big activation bodies with it when present
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    orjson = None
    _loads = json.loads

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 600.0  # seconds; CPU generation with many hooks can be slow
TRANSPORTS = ("inline", "shm")


# --- errors -------------------------------------------------------------------------------
class NeuroScopeError(Exception):
    """Base of every error this client raises."""


class NeuroScopeConnectionError(NeuroScopeError, ConnectionError):
    """The server could not be reached, or the connection broke mid-request."""


class NeuroScopeServerError(NeuroScopeError):
    """The server answered with an error: `{"error": {message, type, param, code}}`.

    `status` is the HTTP status (None for an error event inside an SSE stream, which
    arrives after a 200 header)."""

    def __init__(self, status: int | None, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, body: Any = None):
        self.status, self.message, self.type, self.param, self.code, self.body = status, message, type, param, code, body
        where = f"HTTP {status}" if status is not None else "stream error"
        super().__init__(f"{where} ({code or type or 'error'}): {message}")

    @classmethod
    def from_body(cls, status: int | None, body: Any, fallback: str = "") -> "NeuroScopeServerError":
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return cls(status, str(err.get("message") or fallback), err.get("type"), err.get("param"),
                       err.get("code"), body)
        if isinstance(err, str):
            return cls(status, err, None, None, None, body)
        return cls(status, fallback or f"unexpected answer: {str(body)[:200]}", None, None, None, body)


# --- entries ------------------------------------------------------------------------------
def entry_array(entry: dict) -> np.ndarray:
    """One inline activation entry's values as a float32 numpy array of `entry["shape"]`.

    Reads both encodings: `data` (nested JSON lists) and `data_base64` (raw little-endian bytes
    of `dtype`; bfloat16 bits and float16 are widened to float32 exactly). JSON has no
    infinities: the server writes the causal mask (-inf) of `attention_scores` as `null`,
    which comes back as -inf here; any other `null` comes back as NaN."""
    shape = tuple(int(d) for d in entry["shape"])
    if "data_base64" in entry:
        raw = base64.b64decode(entry["data_base64"])
        dtype = entry.get("dtype", "float32")
        if dtype == "float32":
            a = np.frombuffer(raw, "<f4").astype(np.float32)  # native, owned, writable
        elif dtype == "float16":
            a = np.frombuffer(raw, "<f2").astype(np.float32)
        elif dtype == "bfloat16":
            a = bfloat16_to_float32(np.frombuffer(raw, "<u2"))
        else:
            raise ValueError(f"unsupported dtype {dtype!r} in entry {entry.get('hook_id')!r}")
        return a.reshape(shape)
    if "data" not in entry:
        raise KeyError(f"entry {entry.get('hook_id')!r} carries no data (a shared-memory entry? open its handle)")
    a = np.array(entry["data"], dtype=np.float32)  # null -> NaN
    if a.size == 0:
        a = np.zeros(shape, np.float32)
    a = a.reshape(shape)
    if entry.get("component") == "attention_scores":
        a[np.isnan(a)] = -np.inf
    return a


def merge_activations(into: dict, more: dict | None) -> dict:
    """Append `more`'s entries ({hook_id: [entry]}) to `into`, hook by hook, in arrival order."""
    for hook_id, entries in (more or {}).items():
        into.setdefault(hook_id, []).extend(entries)
    return into


# --- results ------------------------------------------------------------------------------
class ChatCompletion(dict):
    """The server's chat.completion JSON, unchanged (a dict), with a few conveniences."""

    @property
    def text(self) -> str:
        choices = self.get("choices") or [{}]
        return (choices[0].get("message") or {}).get("content") or ""

    @property
    def finish_reason(self) -> str | None:
        choices = self.get("choices") or [{}]
        return choices[0].get("finish_reason")

    @property
    def interventions(self) -> list[dict]:
        """The server's report of the interventions sent: [{index, layer_name, component, op,
        positions_touched: [count per forward step; step 0 = the prompt]}] ([] when none were sent)."""
        return list(self.get("interventions") or [])

    @property
    def baseline(self) -> "ChatCompletion | None":
        """The same request without interventions (sent with `baseline=True`), as a
        ChatCompletion ({choices, usage} plus this completion's id/model), or None."""
        base = self.get("baseline")
        if not isinstance(base, dict):
            return None
        return ChatCompletion({"id": self.get("id"), "object": "chat.completion", "created": self.get("created"),
                               "model": self.get("model"), **base})

    @property
    def logprobs(self) -> list[dict] | None:
        """choices[0].logprobs["content"]: one entry per generated token ({token, logprob, bytes,
        token_id, top_logprobs, target_logprobs?}), or None when log-probabilities were not asked for."""
        choices = self.get("choices") or [{}]
        lp = choices[0].get("logprobs")
        if not isinstance(lp, dict):
            return None
        return lp.get("content")


class ActivationResult(ChatCompletion):
    """A completion with inline activations: `result["activations"]`, `result["tokens"]`,
    `result["choices"]` work as on the original dict."""

    @property
    def activations(self) -> dict:
        return self.get("activations") or {}

    @property
    def tokens(self) -> list[str]:
        return self.get("tokens") or []

    @property
    def token_ids(self) -> list[int]:
        return self.get("token_ids") or []

    @property
    def hook_ids(self) -> list[str]:
        return list(self.activations)

    def arrays(self, hook_id: str, is_input: bool = False) -> list[np.ndarray]:
        """The per-step float32 arrays of one hook (in step order), in the server's layout."""
        return [entry_array(e) for e in self.activations.get(hook_id, []) if bool(e.get("is_input")) == is_input]

    def to_neuroscope(self) -> dict:
        from bridge.neuroscope import to_neuroscope

        return to_neuroscope(self)

    def export(self, path: str, **kw) -> str:
        from bridge.export import save_capture

        return save_capture(self, path, **kw)


class ShmCapture:
    """A capture held in the server's shared memory, mapped here read-only.

    `arrays[hook_id]` is an np.ndarray `[rows, *per_token_shape]` that aliases the segment
    (zero-copy; token-major, attention keys padded: see docs/shm-format.md); `view` is the
    `shm.CaptureView`, `response` the server's JSON (entries carry `handle` instead of data).
    Indexing with a response key (`cap["choices"]`, `cap["activations"]`) reads the response.
    `close()` (or leaving a `with` block) drops the views, unmaps, and releases the capture on
    the server (DELETE /v1/activations/{id}). Copy what you keep: after the release the server
    may reuse the segment. When the segment cannot be mapped from here (another host), the
    client fetches the same Arrow stream over HTTP and `zero_copy` is False."""

    def __init__(self, client: "LMStudioNeuroScopeClient | None", response: dict, view, zero_copy: bool):
        self.client = client
        self.response = ActivationResult(response)
        self.view = view
        self.zero_copy = zero_copy
        self.capture_id: str = response["capture"]["capture_id"]
        self.handle: dict = response["capture"]["handle"]
        self.closed = False
        self.released = False

    # the response, like the inline result
    def __getitem__(self, key: str) -> Any:
        if key in self.response:
            return self.response[key]
        if self.view is not None and key in self.view.hooks:
            return self.view.hooks[key].data
        raise KeyError(key)

    def __contains__(self, key: str) -> bool:
        return key in self.response

    def get(self, key: str, default: Any = None) -> Any:
        return self.response.get(key, default)

    @property
    def text(self) -> str:
        return self.response.text

    @property
    def tokens(self) -> list[str]:
        return self.response.get("tokens") or (self.view.tokens if self.view is not None else [])

    @property
    def token_ids(self) -> list[int]:
        return self.response.get("token_ids") or (self.view.token_ids if self.view is not None else [])

    @property
    def hook_ids(self) -> list[str]:
        return list(self._view().hooks)

    @property
    def interventions(self) -> list[dict]:
        return self.response.interventions

    @property
    def baseline(self) -> "ChatCompletion | None":
        return self.response.baseline

    @property
    def logprobs(self) -> list[dict] | None:
        return self.response.logprobs

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """{column name: np.ndarray} aliasing the shared memory (read-only). The column name is
        the hook_id (a hook captured as input and output: `<id>` and `<id>:input`/`:output`)."""
        return {k: h.data for k, h in self._view().hooks.items()}

    def hook(self, hook_id: str, is_input: bool | None = None):
        """The `shm.HookArray` of one hook (data, step, position, for_step(), to_float32()).
        `hook_id` is the hook's id or its column name; `is_input` picks the input or output
        tensor of a hook captured both ways (their columns are `<id>` and `<id>:input`/`:output`)."""
        hooks = self._view().hooks
        if is_input is None and hook_id in hooks:
            return hooks[hook_id]
        for h in hooks.values():
            if h.info.hook_id == hook_id and (is_input is None or bool(h.info.is_input) == is_input):
                return h
        raise KeyError(hook_id if is_input is None else (hook_id, is_input))

    def array(self, hook_id: str, is_input: bool = False) -> np.ndarray:
        """One hook's [rows, *shape] array (zero-copy), by hook id and direction."""
        return self.hook(hook_id, is_input).data

    @property
    def step(self) -> np.ndarray:
        return self._view().step

    @property
    def position(self) -> np.ndarray:
        return self._view().position

    def _view(self):
        if self.view is None:
            raise ValueError(f"capture {self.capture_id} is closed")
        return self.view

    def to_neuroscope(self) -> dict:
        from bridge.neuroscope import to_neuroscope

        return to_neuroscope(self)

    def export(self, path: str, **kw) -> str:
        from bridge.export import save_capture

        return save_capture(self, path, **kw)

    def close(self, release: bool = True) -> None:
        """Unmap and (by default) release the capture on the server. Idempotent; a capture
        already released or expired on the server is not an error."""
        if self.view is not None:
            self.view.close()
            self.view = None
        self.closed = True
        if release and not self.released and self.client is not None:
            self.released = True
            try:
                self.client.release(self.capture_id)
            except NeuroScopeServerError as exc:
                if exc.status != 404:
                    raise

    def __enter__(self) -> "ShmCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.view.hooks)} hooks"
        return f"<ShmCapture {self.capture_id} {state} zero_copy={self.zero_copy}>"


# --- streams ------------------------------------------------------------------------------
class StreamEvent:
    """One SSE chunk of an activation stream.

    `text`: the text delta ('' when the chunk has none); `activations`: {hook_id: [entry]} that
    arrived with this chunk (the step that produced this token; the last chunk also brings the
    final step); `finish_reason`: set on the last chunk; `tokens`: the text of every position
    (last chunk); `capture`: the opened `ShmCapture` (last chunk of an shm stream; close it);
    `chunk`: the raw chat.completion.chunk."""

    __slots__ = ("text", "activations", "finish_reason", "tokens", "capture", "chunk", "usage")

    def __init__(self, chunk: dict):
        choices = chunk.get("choices") or []
        choice = choices[0] if choices else {}
        delta = choice.get("delta") or {}
        self.chunk = chunk
        self.text: str = delta.get("content") or ""
        self.finish_reason: str | None = choice.get("finish_reason")
        self.activations: dict = chunk.get("activations") or {}
        self.tokens: list[str] | None = chunk.get("tokens")
        self.capture: ShmCapture | None = None
        self.usage: dict | None = chunk.get("usage")

    @property
    def steps(self) -> list[int]:
        """The steps whose activations this chunk carries (0 = prompt)."""
        return sorted({e["step"] for entries in self.activations.values() for e in entries if "step" in e})

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return f"<StreamEvent text={self.text!r} steps={self.steps} finish_reason={self.finish_reason}>"


def _iter_sse(resp: requests.Response) -> Iterator[dict]:
    """Parse `data:` events of a Server-Sent Events body as JSON, up to `data: [DONE]`.

    An `{"error": ...}` event raises NeuroScopeServerError."""
    buf = b""
    data_lines: list[bytes] = []
    try:
        for piece in resp.iter_content(chunk_size=None):
            buf += piece
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1:]
                if line == b"":
                    if not data_lines:
                        continue
                    payload = b"\n".join(data_lines)
                    data_lines = []
                    if payload.strip() == b"[DONE]":
                        return
                    obj = _loads(payload)
                    if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                        raise NeuroScopeServerError.from_body(None, obj, "the server reported an error mid-stream")
                    yield obj
                elif line.startswith(b"data:"):
                    data_lines.append(line[5:].lstrip(b" ") if line[5:6] == b" " else line[5:])
                # comments (":") and other fields (event:, id:, retry:) are ignored
    except requests.RequestException as exc:
        raise NeuroScopeConnectionError(f"the stream broke: {exc}") from exc
    if data_lines:  # body ended without a blank line
        payload = b"\n".join(data_lines)
        if payload.strip() != b"[DONE]":
            yield _loads(payload)


class ChatStream:
    """Iterate for the text deltas (str) of a streamed chat completion.

    Also gathered while iterating: `logprobs` (the content entries of every chunk, when asked
    for, else None), `interventions` (the report, sent after the last token) and `baseline`
    (a ChatCompletion, with `baseline=True`)."""

    def __init__(self, resp: requests.Response):
        self._resp = resp
        self._events = _iter_sse(resp)
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.chunks: list[dict] = []
        self.logprobs: list[dict] | None = None
        self.interventions: list[dict] = []
        self.baseline: ChatCompletion | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self._events:
                self.chunks.append(chunk)
                self.usage = chunk.get("usage") or self.usage
                if chunk.get("interventions"):
                    self.interventions = list(chunk["interventions"])
                if isinstance(chunk.get("baseline"), dict):
                    self.baseline = ChatCompletion({"model": chunk.get("model"), **chunk["baseline"]})
                for choice in chunk.get("choices") or []:
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    lp = choice.get("logprobs")
                    if isinstance(lp, dict):
                        self.logprobs = (self.logprobs or []) + list(lp.get("content") or [])
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        self.text += delta
                        yield delta
        finally:
            self.close()

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActivationStream:
    """Iterate for `StreamEvent`s of a streamed completion with activations.

    While iterating it accumulates `text`, `activations` (the same {hook_id: [entry]} a
    non-streamed inline request returns), `tokens`, `finish_reason`, `usage` and, for shm,
    `capture` (an open `ShmCapture`: close it). `result()` reads what is left and returns an
    `ActivationResult` shaped like the non-streamed answer (or the `ShmCapture`)."""

    def __init__(self, client: "LMStudioNeuroScopeClient", resp: requests.Response, transport: str):
        self.client, self._resp, self.transport = client, resp, transport
        self._events = _iter_sse(resp)
        self._started = False
        self.finished = False
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.text = ""
        self.activations: dict = {}
        self.tokens: list[str] | None = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.capture: ShmCapture | None = None
        self.logprobs: list[dict] | None = None
        self.interventions: list[dict] = []
        self.baseline: dict | None = None

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._started:
            raise RuntimeError("an ActivationStream can be iterated once")
        self._started = True
        try:
            for chunk in self._events:
                self.id = self.id or chunk.get("id")
                self.model = self.model or chunk.get("model")
                self.created = self.created or chunk.get("created")
                event = StreamEvent(chunk)
                self.text += event.text
                if event.tokens is not None:
                    self.tokens = event.tokens
                if event.finish_reason is not None:
                    self.finish_reason = event.finish_reason
                if event.usage:
                    self.usage = event.usage
                if chunk.get("interventions"):
                    self.interventions = list(chunk["interventions"])
                if isinstance(chunk.get("baseline"), dict):
                    self.baseline = chunk["baseline"]
                for choice in chunk.get("choices") or []:
                    lp = choice.get("logprobs")
                    if isinstance(lp, dict):
                        self.logprobs = (self.logprobs or []) + list(lp.get("content") or [])
                if chunk.get("capture") and self.transport == "shm":
                    # entries there carry handles, not data: the capture holds the arrays
                    event.activations = {}
                    event.capture = self.capture = self.client._open_shm(self._completion(chunk))
                merge_activations(self.activations, event.activations)
                if not (chunk.get("choices") or []) and not event.activations and event.capture is None:
                    continue  # the usage-only chunk: nothing for the caller beyond `usage`
                yield event
            self.finished = True
        finally:
            self._resp.close()

    def result(self) -> "ActivationResult | ShmCapture":
        """Consume the rest of the stream; the non-streamed form of what it carried."""
        if not self._started:
            for _ in self:
                pass
        elif not self.finished:
            raise RuntimeError("the stream was only partly read; iterate it to the end (or call result() first)")
        if self.transport == "shm" and self.capture is not None:
            if self.usage:
                self.capture.response.setdefault("usage", self.usage)
            self.capture.response.update(self._extras())
            return self.capture
        out = self._completion({"tokens": self.tokens or [], "activations": self.activations})
        if self.usage:
            out["usage"] = self.usage
        out.update(self._extras())
        return ActivationResult(out)

    def _extras(self) -> dict:
        """What the stream carried besides tokens and activations, in the non-streamed places."""
        out: dict = {}
        if self.interventions:
            out["interventions"] = self.interventions
        if self.baseline is not None:
            out["baseline"] = self.baseline
        return out

    def _completion(self, extra: dict) -> dict:
        """A chat.completion built from what the stream carried so far."""
        out = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                         "logprobs": None if self.logprobs is None else {"content": list(self.logprobs)},
                         "finish_reason": self.finish_reason}],
        }
        for key in ("tokens", "capture", "activations", "token_ids", "usage"):
            if key in extra:
                out[key] = extra[key]
        return out

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> "ActivationStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the client ---------------------------------------------------------------------------
def _messages(messages: Any) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return list(messages)


def _raw_prompt(prompt: Any) -> "str | list[int]":
    """A raw prompt as the request field `prompt` takes it: text, or a list of token ids
    (ints or numpy integers; a numpy array works too)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in prompt):
        return [int(t) for t in prompt]
    raise TypeError(f"prompt must be raw text (a str) or a list of token ids (ints), not {type(prompt).__name__}")


def _prompt_field(messages: Any, prompt: Any) -> dict:
    """The request's input, exactly one of {"messages": the chat (through the chat template)} or
    {"prompt": raw text or token ids (continued without the chat template)}."""
    if prompt is not None:
        if messages is not None:
            raise ValueError("give either messages (a chat) or prompt= (raw text or token ids), not both")
        return {"prompt": _raw_prompt(prompt)}
    if messages is None:
        raise ValueError("give messages (a chat; a str is one user message) or prompt= (raw text or token ids)")
    return {"messages": _messages(messages)}


def _analysis_input(prompt: Any) -> dict:
    """The input of the analysis methods (logit_difference, patching_sweep) as chat()'s keywords:
    a str or a list of token ids is a raw prompt (prompt=, no chat template); a list of message
    dicts is a chat (messages=). chat() itself differs: there a bare str is one user message."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return {"messages": list(prompt)}
    try:
        return {"prompt": _raw_prompt(prompt)}
    except TypeError:
        raise TypeError("give the prompt as raw text (a str), a list of token ids, or a chat (a list of message "
                        f"dicts {{role, content}}), not {type(prompt).__name__} {str(prompt)[:60]!r}") from None


def _hooks(hooks: Iterable | None) -> list[dict] | None:
    if hooks is None:
        return None
    out = []
    for h in hooks:
        if isinstance(h, str):  # a TransformerLens name names its tensor by itself
            out.append({"layer_name": h})
        elif isinstance(h, dict):
            out.append(dict(h))
        elif hasattr(h, "to_dict"):
            out.append(h.to_dict())
        else:
            raise TypeError(f"a hook must be a dict or a hook name, not {type(h).__name__}")
    return out


def _jsonable(value: Any) -> Any:
    """numpy arrays and scalars inside a request body -> plain lists and numbers (exact: a
    float32 widens to a float64 that reads back as the same float32)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _interventions(interventions: Iterable | None) -> list[dict] | None:
    """Intervention specs as the server takes them: dicts (or objects with `to_dict()`); numpy
    vectors become lists; a stored vector's description (what `create_vector` returns) given as
    `vector_id` becomes its id; a patch `source.capture_id` may be a ShmCapture or a response."""
    if interventions is None:
        return None
    if isinstance(interventions, dict):
        interventions = [interventions]
    out = []
    for spec in interventions:
        if hasattr(spec, "to_dict") and not isinstance(spec, dict):
            spec = spec.to_dict()
        if not isinstance(spec, dict):
            raise TypeError(f"an intervention must be a dict, not {type(spec).__name__}")
        spec = dict(spec)
        if isinstance(spec.get("vector_id"), dict):
            spec["vector_id"] = spec["vector_id"]["vector_id"]
        source = spec.get("source")
        if isinstance(source, dict) and "capture_id" in source and not isinstance(source["capture_id"], str):
            spec["source"] = {**source, "capture_id": _capture_id(source["capture_id"])}
        out.append(_jsonable(spec))
    return out


def _generation_fields(interventions: Iterable | None, baseline: bool, logprobs: bool | None,
                       top_logprobs: int | None, logprob_token_ids: Iterable[int] | None) -> dict:
    """The intervention, baseline and log-probability fields of a request, only those given."""
    body: dict = {}
    specs = _interventions(interventions)
    if specs is not None:
        body["interventions"] = specs
    if baseline:
        body["baseline"] = True
    if logprobs is not None:
        body["logprobs"] = bool(logprobs)
    if top_logprobs is not None:
        body["top_logprobs"] = int(top_logprobs)
    if logprob_token_ids is not None:
        body["logprob_token_ids"] = [_token_id(t) for t in logprob_token_ids]
    return body


def _token_id(token: Any) -> int:
    """A token id (int or numpy integer). Strings are refused: the server has no tokenize
    endpoint, so pick ids from a response's `token_ids`/`logprobs` or from the model's tokenizer."""
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
        raise TypeError(f"a token must be given as its id (an int), not {type(token).__name__} {token!r}; "
                        "the server has no tokenize endpoint: take ids from a response's token_ids or "
                        "logprobs, or from the model's tokenizer")
    return int(token)


def _vector_id(vector: Any) -> str:
    if isinstance(vector, str):
        return vector
    if isinstance(vector, dict) and isinstance(vector.get("vector_id"), str):
        return vector["vector_id"]
    raise TypeError(f"cannot tell the vector id of {type(vector).__name__}")


def _describe_vector(desc: dict) -> dict:
    """A GET /v1/vectors/{id} answer with `vector` as a float32 array of `shape`."""
    out = dict(desc)
    if "vector" in out:
        a = np.asarray(out["vector"], dtype=np.float32)
        shape = out.get("shape")
        out["vector"] = a.reshape(tuple(shape)) if shape else a
    return out


ATTRIBUTION_ARROW = "application/vnd.apache.arrow.stream"


def _one_run(prompt: Any, name: str) -> dict:
    """One run of an attribution: {"prompt": ...} or {"messages": [...]} (a dict passes as it is)."""
    if isinstance(prompt, dict) and set(prompt) <= {"prompt", "messages"} and prompt:
        return _jsonable(prompt)
    try:
        return _analysis_input(prompt)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None


def _metric(metric: Any) -> dict:
    """(a, b) -> logit_diff; a -> logprob; a dict passes as it is."""
    if isinstance(metric, dict):
        return _jsonable(metric)
    if isinstance(metric, (list, tuple, np.ndarray)) and len(metric) == 2:
        return {"type": "logit_diff", "token_ids": [_token_id(t) for t in metric]}
    if isinstance(metric, (int, np.integer)) and not isinstance(metric, (bool, np.bool_)):
        return {"type": "logprob", "token_id": int(metric)}
    raise TypeError("metric must be (a, b) token ids for logit(a) - logit(b), a token id for its log-probability, "
                    f"or a dict {{'type': 'logit_diff' | 'logprob', ...}}, not {type(metric).__name__}")


# TransformerLens hook names of the sites a patching sweep can patch.
PATCH_SITES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
}


@dataclass
class PatchingResult:
    """The outcome of `LMStudioNeuroScopeClient.patching_sweep`.

    `clean` / `corrupted`: the logit differences logit(target) - logit(foil) of the two prompts
    unpatched; `effects[i]` (site "head": `effects[i, h]`): the corrupted run's logit difference
    with `site` of layer `layers[i]` (head h) patched from the clean run; `normalized`:
    (effects - corrupted) / (clean - corrupted), 1 = the patch restores the clean behaviour,
    0 = no effect (NaN where clean == corrupted)."""

    clean: float
    corrupted: float
    effects: np.ndarray
    normalized: np.ndarray
    site: str
    layers: list[int]
    heads: list[int] | None = None
    hook_names: list[str] = field(default_factory=list)
    target: int | None = None
    foil: int | None = None
    positions: Any = "prompt"

    def to_dict(self) -> dict:
        """A JSON-able form (arrays as nested lists; NaN as None)."""

        def clean_list(a: np.ndarray) -> Any:
            return [clean_list(x) for x in a] if a.ndim > 1 else [None if not math.isfinite(v) else float(v)
                                                                   for v in a.tolist()]

        heads = None if self.heads is None else list(self.heads)
        return {"site": self.site, "layers": list(self.layers), "heads": heads,
                "hook_names": list(self.hook_names), "target": self.target, "foil": self.foil,
                "positions": self.positions, "clean": self.clean, "corrupted": self.corrupted,
                "effects": clean_list(np.asarray(self.effects, dtype=np.float64)),
                "normalized": clean_list(np.asarray(self.normalized, dtype=np.float64))}


def _capture_id(capture: Any) -> str:
    if isinstance(capture, str):
        return capture
    if isinstance(capture, ShmCapture):
        return capture.capture_id
    if isinstance(capture, dict):
        if "capture" in capture:
            return capture["capture"]["capture_id"]
        if "capture_id" in capture:
            return capture["capture_id"]
    cid = getattr(capture, "capture_id", None)
    if isinstance(cid, str):
        return cid
    raise TypeError(f"cannot tell the capture id of {type(capture).__name__}")


@dataclass
class AttributionResult:
    """The answer of `LMStudioNeuroScopeClient.attribution` (POST /v1/attribution), column-wise.

    One entry per site, position and head, in the order the sites were given: `layer_name`,
    `component` (object arrays), `position`, `head` (int arrays; head -1 on whole-site rows), `estimate`
    (float64) and, with method atp*, `graddrop` (AtP*'s GradDrop score). `verified`: the rows really
    patched (`patched`; None where the server's time limit skipped it). `matrix()` gives a site x
    position (x head) array for heatmaps."""

    method: str
    clean_metric: float
    corrupted_metric: float
    layer_name: np.ndarray
    component: np.ndarray
    position: np.ndarray
    head: np.ndarray
    estimate: np.ndarray
    graddrop: np.ndarray | None = None
    verified: list[dict] = field(default_factory=list)
    n_tokens: int = 0
    clean_tokens: list[str] = field(default_factory=list)
    corrupted_tokens: list[str] = field(default_factory=list)
    metric: dict = field(default_factory=dict)
    model: str | None = None

    @classmethod
    def from_arrow(cls, data: bytes) -> "AttributionResult":
        import pyarrow as pa

        table = pa.ipc.open_stream(data).read_all()
        meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items()}
        head = table.column("head").to_numpy(zero_copy_only=False)
        cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        return cls._make(meta, cols["layer_name"].astype(object), cols["component"].astype(object),
                         cols["position"], np.where(np.isnan(head.astype(np.float64)), -1, head), cols["estimate"],
                         cols.get("graddrop"))

    @classmethod
    def from_json(cls, body: dict) -> "AttributionResult":
        rows = body["attributions"]
        graddrop = np.array([r["graddrop"] for r in rows], np.float64) if rows and "graddrop" in rows[0] else None
        return cls._make(body, np.array([r["layer_name"] for r in rows], object),
                         np.array([r["component"] for r in rows], object), [r["position"] for r in rows],
                         [r.get("head", -1) for r in rows], [r["estimate"] for r in rows], graddrop)

    @classmethod
    def _make(cls, meta: dict, layer_name, component, position, head, estimate, graddrop) -> "AttributionResult":
        return cls(method=meta.get("method", "atp"), clean_metric=meta["clean_metric"],
                   corrupted_metric=meta["corrupted_metric"], layer_name=layer_name, component=component,
                   position=np.asarray(position, np.int64), head=np.asarray(head, np.int64),
                   estimate=np.asarray(estimate, np.float64),
                   graddrop=None if graddrop is None else np.asarray(graddrop, np.float64),
                   verified=list(meta.get("verified") or []), n_tokens=int(meta.get("n_tokens", 0)),
                   clean_tokens=list(meta.get("clean_tokens") or []),
                   corrupted_tokens=list(meta.get("corrupted_tokens") or []), metric=dict(meta.get("metric") or {}),
                   model=meta.get("model"))

    def __len__(self) -> int:
        return len(self.estimate)

    @property
    def sites(self) -> list[str]:
        """The sites' layer names, in the order given (once each)."""
        return list(dict.fromkeys(self.layer_name.tolist()))

    def rows(self) -> list[dict]:
        """The rows as the JSON answer writes them."""
        out = []
        for i in range(len(self)):
            row = {"layer_name": self.layer_name[i], "component": self.component[i], "position": int(self.position[i])}
            if self.head[i] >= 0:
                row["head"] = int(self.head[i])
            row["estimate"] = float(self.estimate[i])
            if self.graddrop is not None:
                row["graddrop"] = float(self.graddrop[i])
            out.append(row)
        return out

    def top(self, k: int = 10) -> list[dict]:
        """The k rows with the largest |estimate| (atp*: the largest GradDrop score)."""
        score = self.graddrop if self.graddrop is not None else np.abs(self.estimate)
        rows = self.rows()
        return [rows[i] for i in np.argsort(-score, kind="stable")[:k]]

    def matrix(self, component: str | None = None, value: str = "estimate") -> tuple[list[str], np.ndarray]:
        """(site names, array): one row per site (of `component`, if given) and one column per position;
        per-head sites add a last axis of heads. `value`: "estimate" or "graddrop"."""
        values = self.estimate if value == "estimate" else self.graddrop
        if values is None:
            raise ValueError(f"no {value!r} in this result (graddrop comes with method 'atp*')")
        keep = np.ones(len(self), bool) if component is None else self.component == component
        names = list(dict.fromkeys(self.layer_name[keep].tolist()))
        if not names:
            raise ValueError(f"no site of component {component!r}; components here: "
                             f"{sorted(set(self.component.tolist()))}")
        per_head = bool((self.head[keep] >= 0).any())
        if per_head and not (self.head[keep] >= 0).all():
            raise ValueError("these sites mix per-head and whole-site rows: pick one component")
        n_heads = int(self.head[keep].max()) + 1 if per_head else 0
        out = np.full((len(names), self.n_tokens, n_heads) if per_head else (len(names), self.n_tokens), np.nan)
        index = {name: i for i, name in enumerate(names)}
        for i in np.flatnonzero(keep):
            at = (index[self.layer_name[i]], self.position[i]) + ((self.head[i],) if per_head else ())
            out[at] = values[i]
        return names, out


class LMStudioNeuroScopeClient:
    """A client of the activation server (OpenAI chat plus the activation endpoints)."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: float | tuple[float, float] | None = DEFAULT_TIMEOUT,
                 session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"LMStudioNeuroScopeClient({self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "LMStudioNeuroScopeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------
    def _raw(self, method: str, path: str, json_body: Any = None, stream: bool = False,
             timeout: Any = None, headers: dict | None = None) -> requests.Response:
        url = self.base_url + path
        kwargs: dict = {"timeout": self.timeout if timeout is None else timeout, "stream": stream,
                        "headers": dict(headers or {})}
        if json_body is not None:
            if orjson is not None:
                kwargs["data"] = orjson.dumps(json_body, option=orjson.OPT_SERIALIZE_NUMPY)
                kwargs["headers"]["Content-Type"] = "application/json"
            else:  # pragma: no cover
                kwargs["json"] = json_body
        try:
            resp = self.session.request(method, url, **kwargs)
        except requests.RequestException as exc:
            raise NeuroScopeConnectionError(f"{method} {url} failed: {exc}") from exc
        if not resp.ok:
            try:
                body = _loads(resp.content)
            except Exception:
                body = None
            resp.close()
            raise NeuroScopeServerError.from_body(resp.status_code, body, resp.text[:500] or resp.reason or "")
        return resp

    def request(self, method: str, path: str, json_body: Any = None) -> Any:
        """Any endpoint: the parsed JSON answer; errors raise NeuroScopeServerError."""
        resp = self._raw(method, path, json_body)
        if not resp.content:
            return None
        try:
            return _loads(resp.content)
        except Exception as exc:
            raise NeuroScopeServerError(resp.status_code, f"the answer is not JSON: {resp.text[:200]}") from exc

    # --- models ---------------------------------------------------------------------------
    def health(self) -> dict:
        """GET /health: {"status": "ok", "model_loaded", "model_id", ...}."""
        return self.request("GET", "/health")

    def list_models(self) -> list[dict]:
        """GET /v1/models: the model cards (the `data` list)."""
        return self.request("GET", "/v1/models").get("data", [])

    def load_model(self, path: str, model_id: str | None = None) -> dict:
        """POST /v1/models/load; `path` is a model folder, a .gguf file or "default"."""
        body = {"model_path": str(path)}
        if model_id is not None:
            body["model_id"] = model_id
        return self.request("POST", "/v1/models/load", body)

    # --- chat -----------------------------------------------------------------------------
    def chat(self, messages: Any = None, max_tokens: int = 256, temperature: float = 0.7, stream: bool = False, *,
             prompt: "str | Sequence[int] | None" = None,
             interventions: Iterable | None = None, baseline: bool = False, logprobs: bool | None = None,
             top_logprobs: int | None = None, logprob_token_ids: Iterable[int] | None = None,
             **extra) -> ChatCompletion | ChatStream:
        """POST /v1/chat/completions. Returns the completion (a dict with `.text`), or with
        `stream=True` a `ChatStream` that yields the text deltas.

        The input is exactly one of `messages` (a chat: a list of {role, content} dicts; a str is
        one user message, sent through the chat template) or `prompt=` (raw text, or a list of
        token ids, continued without the chat template: what interpretability prompts such as
        "When Mary and John went to the store, John gave a drink to" need). Both or neither
        raise ValueError.

        `interventions`: [{layer_name, component?, op, coefficient?, vector? | vector_id?, min?,
        max?, positions?, heads?, indices?, source?}] (docs/interventions.md; numpy vectors are
        fine) -> the report in `.interventions`. `baseline=True` also runs the request without
        the interventions (same sampling and seed) -> `.baseline`. `logprobs`, `top_logprobs`
        (OpenAI's) and `logprob_token_ids` (the log-probabilities of these token ids at every
        generated token) -> `.logprobs`. Each is sent only when given."""
        body = {**_prompt_field(messages, prompt), "max_tokens": max_tokens, "temperature": temperature,
                "stream": bool(stream),
                **_generation_fields(interventions, baseline, logprobs, top_logprobs, logprob_token_ids),
                **extra}
        if stream:
            return ChatStream(self._raw("POST", "/v1/chat/completions", body, stream=True))
        return ChatCompletion(self.request("POST", "/v1/chat/completions", body))

    def generate_with_activations(self, messages: Any = None, activation_hooks: Iterable | None = None,
                                  max_tokens: int = 100, temperature: float = 0.7, stream: bool = False,
                                  transport: str = "inline", *, prompt: "str | Sequence[int] | None" = None,
                                  encoding: str | None = None,
                                  positions: str | None = None, dtype: str | None = None,
                                  interventions: Iterable | None = None, baseline: bool = False,
                                  logprobs: bool | None = None, top_logprobs: int | None = None,
                                  logprob_token_ids: Iterable[int] | None = None,
                                  **extra) -> "ActivationResult | ShmCapture | ActivationStream":
        """POST /v1/chat/completions/with_activations.

        The input: `messages` (a chat; a str is one user message) or `prompt=` (raw text or token
        ids, continued without the chat template), exactly one, as in `chat()`. `activation_hooks`: [{layer_name, component, hook_id?, capture_input?, capture_output?}]
        (or TransformerLens names as strings); None uses the hooks registered on the server.
        `transport`: "inline" -> `ActivationResult` (the response dict); "shm" -> an open
        `ShmCapture` (zero-copy arrays; close it). `stream=True` -> an `ActivationStream` of
        `StreamEvent`s. `encoding` ("json" | "base64"), `positions` ("all" | "last" | "prompt" |
        "generated") and `dtype` ("float32" | "float16" | "bfloat16") map to the request fields
        activations_encoding, activation_positions and activation_dtype. `interventions`,
        `baseline`, `logprobs`, `top_logprobs` and `logprob_token_ids` as in `chat()` (the
        capture records the intervened run). Other keyword arguments (seed, top_p, stop, ...)
        are sent as they are."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        body: dict = {**_prompt_field(messages, prompt), "max_tokens": max_tokens, "temperature": temperature,
                      "stream": bool(stream), "activations_transport": transport}
        hooks = _hooks(activation_hooks)
        if hooks is not None:
            body["activation_hooks"] = hooks
        for key, value in (("activations_encoding", encoding), ("activation_positions", positions),
                           ("activation_dtype", dtype)):
            if value is not None:
                body[key] = value
        if stream:
            body.setdefault("stream_options", {"include_usage": True})
        body.update(_generation_fields(interventions, baseline, logprobs, top_logprobs, logprob_token_ids))
        body.update(extra)
        path = "/v1/chat/completions/with_activations"
        if stream:
            return ActivationStream(self, self._raw("POST", path, body, stream=True), transport)
        response = self.request("POST", path, body)
        if transport == "shm" and response.get("capture"):
            return self._open_shm(response)
        return ActivationResult(response)

    def _open_shm(self, response: dict) -> ShmCapture:
        """Map the capture named by a response's `capture` (fall back to HTTP when the
        segment is not visible from this host)."""
        from shm import open_capture, read_capture_bytes

        capture_id = response["capture"]["capture_id"]
        try:
            view, zero_copy = open_capture(response["capture"]["handle"]), True
        except (FileNotFoundError, PermissionError, OSError):
            view, zero_copy = read_capture_bytes(self._capture_bytes(capture_id)), False
        return ShmCapture(self, response, view, zero_copy)

    # --- hooks ----------------------------------------------------------------------------
    def register_hooks(self, hooks: Iterable) -> dict:
        """POST /v1/activations/hooks: hooks for later activation requests that name none."""
        return self.request("POST", "/v1/activations/hooks", {"hooks": _hooks(hooks)})

    def list_hooks(self) -> list[dict]:
        """GET /v1/activations/hooks: the registered hooks."""
        return self.request("GET", "/v1/activations/hooks").get("hooks", [])

    def clear_hooks(self) -> dict:
        """DELETE /v1/activations/hooks."""
        return self.request("DELETE", "/v1/activations/hooks")

    def hook_points(self) -> dict:
        """GET /v1/activations/points: {"model_id", "n_layers", "points": [{name, aliases,
        module_path, layer, component, is_input, shape_per_token, dtype}]}."""
        return self.request("GET", "/v1/activations/points")

    # --- captures in shared memory --------------------------------------------------------
    def list_captures(self) -> dict:
        """GET /v1/activations: live segments and shared-memory totals."""
        return self.request("GET", "/v1/activations")

    def release(self, capture: Any) -> dict:
        """DELETE /v1/activations/{id}. `capture`: a capture id, a `ShmCapture` (also unmapped
        here), or a response holding `capture`. Releasing an unknown id raises (404)."""
        if isinstance(capture, ShmCapture):
            if capture.view is not None:
                capture.view.close()
                capture.view = None
            capture.closed = capture.released = True
        return self.request("DELETE", f"/v1/activations/{_capture_id(capture)}")

    def _capture_bytes(self, capture_id: str) -> bytes:
        return self._raw("GET", f"/v1/activations/{capture_id}").content

    def fetch_capture(self, capture: Any):
        """GET /v1/activations/{id}: the capture's Arrow stream over HTTP (for a client on
        another host) -> an `shm.CaptureView` over the downloaded bytes. Does not release."""
        from shm import read_capture_bytes

        return read_capture_bytes(self._capture_bytes(_capture_id(capture)))

    def logit_lens(self, capture: Any, top_k: int = 5, layers: Sequence[int] | None = None,
                   positions: Sequence[int] | None = None) -> dict:
        """POST /v1/activations/{id}/logit_lens: each captured residual-stream output (blocks.N.hook_resid_post)
        read through the final norm and the unembedding, on the server -> {layers, positions, token_ids
        [L][T][k], probs [L][T][k], strings {id: text}}. Only the top-k travel (docs/viz.md)."""
        body: dict = {"top_k": top_k}
        if layers is not None:
            body["layers"] = [int(n) for n in layers]
        if positions is not None:
            body["positions"] = [int(p) for p in positions]
        return self.request("POST", f"/v1/activations/{_capture_id(capture)}/logit_lens", body)

    # --- stored vectors -------------------------------------------------------------------
    def create_vector(self, vector: Any = None, *, name: str | None = None, layer: int | None = None,
                      data: bytes | str | None = None, dtype: str | None = None,
                      shape: Sequence[int] | None = None, from_capture: dict | None = None) -> dict:
        """POST /v1/vectors: store a vector on the server (it belongs to the loaded model) ->
        its description {vector_id, name, shape, dtype, layer, source, created, norm}.

        Exactly one source: `vector` (a list [n] / [heads, n], or a numpy array: sent exactly as
        base64 little-endian float32, float16 arrays as float16), `data` (raw bytes or base64
        text of `dtype` values, default dtype "float32", optional `shape`) or `from_capture`
        ({capture_id, hook_id, reduce: "mean" | "last", positions: "all" | "prompt" |
        "generated" | [..]}; capture_id may be a ShmCapture: the capture must still be live).
        `name` and `layer` are labels. Use the id as an intervention's `vector_id`."""
        given = [k for k, v in (("vector", vector), ("data", data), ("from_capture", from_capture)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of vector, data or from_capture (got {', '.join(given) or 'none'})")
        body: dict = {}
        if vector is not None:
            if isinstance(vector, (list, tuple)):
                if dtype is not None or shape is not None:
                    raise ValueError("dtype and shape go with data (or a numpy array), not with a list")
                body["vector"] = _jsonable(vector)
            else:
                body.update(_encode_array(np.asarray(vector), dtype))
                if shape is not None:
                    body["shape"] = [int(d) for d in shape]
        elif data is not None:
            if isinstance(data, (bytes, bytearray, memoryview)):
                data = base64.b64encode(bytes(data)).decode("ascii")
            body["data"] = data
            body["dtype"] = dtype or "float32"
            if shape is not None:
                body["shape"] = [int(d) for d in shape]
        else:
            if not isinstance(from_capture, dict):
                raise TypeError("from_capture must be a dict {capture_id, hook_id, reduce?, positions?}")
            fc = dict(from_capture)
            if "capture_id" in fc and not isinstance(fc["capture_id"], str):
                fc["capture_id"] = _capture_id(fc["capture_id"])
            body["from_capture"] = _jsonable(fc)
        if name is not None:
            body["name"] = name
        if layer is not None:
            body["layer"] = int(layer)
        return self.request("POST", "/v1/vectors", body)

    def list_vectors(self) -> list[dict]:
        """GET /v1/vectors: the stored vectors' descriptions (without values)."""
        return self.request("GET", "/v1/vectors").get("data", [])

    def get_vector(self, vector_id: Any) -> dict:
        """GET /v1/vectors/{id}: the description, with `vector` as an np.float32 array of `shape`.
        `vector_id`: the id or a description. An unknown id raises NeuroScopeServerError (404)."""
        return _describe_vector(self.request("GET", f"/v1/vectors/{_vector_id(vector_id)}"))

    def delete_vector(self, vector_id: Any) -> dict:
        """DELETE /v1/vectors/{id} -> {"vector_id", "status": "deleted"} (unknown id: 404)."""
        return self.request("DELETE", f"/v1/vectors/{_vector_id(vector_id)}")

    def import_control_vector(self, path_or_bytes: "str | Path | bytes", name: str | None = None) -> list[dict]:
        """POST /v1/vectors {"controlvector"}: store a llama.cpp control-vector GGUF (a path or
        its bytes) -> one description per layer, named "<name>.direction.N" (`name` defaults to
        the file's stem, or "controlvector" for bytes). `layer` N is llama.cpp's direction.N, added to
        the residual stream after layer N: use it as {"op": "add", "layer_name":
        f"blocks.{N}.hook_resid_post", "vector_id": ...}."""
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            raw = bytes(path_or_bytes)
        else:
            raw = Path(path_or_bytes).read_bytes()
            if name is None:  # as the server names a file it reads itself: "<stem>.direction.N"
                name = Path(path_or_bytes).stem
        body: dict = {"controlvector": base64.b64encode(raw).decode("ascii")}
        if name is not None:
            body["name"] = name
        return self.request("POST", "/v1/vectors", body).get("data", [])

    # --- harvesting -----------------------------------------------------------------------
    def harvest(self, hooks: Iterable[str], documents: Iterable | None = None, *, input_path: str | None = None,
                wait: bool = False, poll_s: float = 0.5, **options) -> dict:
        """POST /v1/harvest: start a job that writes every token's activations to Parquet shards in a
        server-owned directory (the status' `out`; docs/harvest.md). `hooks`: TransformerLens names or
        "layer_name:component"; `documents`: strings (raw text), {"text"} or {"messages"} objects, or
        `input_path`: a .jsonl/.parquet file on the server. `options`: context, truncate, dtype,
        shard_rows, max_tokens, shuffle, batch_size, batch_tokens. Returns the job's status; with
        `wait`, polls until it ends (a failed job raises NeuroScopeError)."""
        body: dict = {"hooks": [str(h) for h in hooks], **{k: v for k, v in options.items() if v is not None}}
        if documents is not None:
            body["documents"] = [{"text": d} if isinstance(d, str) else dict(d) for d in documents]
        if input_path is not None:
            body["input_path"] = str(input_path)
        status = self.request("POST", "/v1/harvest", body)
        while wait and status["state"] in ("running", "cancelling"):
            time.sleep(poll_s)
            status = self.harvest_status(status["id"])
        if wait and status["state"] == "failed":
            raise NeuroScopeError(f"harvest {status['id']} failed: {status['error']}")
        return status

    def harvest_status(self, job_id: str) -> dict:
        """GET /v1/harvest/{id}: state (running, cancelling, completed, failed, cancelled), progress
        (tokens_done, tokens_total, tokens_per_s, bytes_written, eta_s), error, result."""
        return self.request("GET", f"/v1/harvest/{job_id}")

    def cancel_harvest(self, job_id: str) -> dict:
        """POST /v1/harvest/{id}/cancel: stop after the current forward; the finished shards stay."""
        return self.request("POST", f"/v1/harvest/{job_id}/cancel")

    # --- interventions --------------------------------------------------------------------
    def compare_with_baseline(self, messages: Any = None, interventions: Iterable | None = None, *,
                              prompt: "str | Sequence[int] | None" = None,
                              **kw) -> tuple[ChatCompletion, ChatCompletion]:
        """One request with `interventions` and baseline=True -> (steered, baseline): the
        intervened completion and the same request without interventions (same sampling and
        seed; the server picks a seed for both when none is given). The input is `messages` (a
        chat; a str is one user message) or `prompt=` (raw text or token ids), as in `chat()`;
        `kw` as in `chat()`:

            client.compare_with_baseline(prompt="When Mary and John went to the store, John gave a drink to",
                                         interventions=[{"layer_name": "blocks.23.attn.hook_z", "op": "zero",
                                                         "heads": [3]}], max_tokens=1, temperature=0)
        """
        if kw.get("stream"):
            raise ValueError("compare_with_baseline does not stream; use chat(..., baseline=True, stream=True)")
        if interventions is None:
            raise ValueError("compare_with_baseline needs interventions (the baseline is the run without them)")
        kw.pop("baseline", None)
        steered = self.chat(messages, interventions=interventions, baseline=True, prompt=prompt, **kw)
        base = steered.baseline
        if base is None:
            raise NeuroScopeError("the server sent no baseline (does it support interventions?)")
        return steered, base

    def logit_difference(self, prompt: Any, target: int, foil: int, interventions: Iterable | None = None,
                         **kw) -> float:
        """logit(target) - logit(foil) at the first generated token (greedy, one token), from
        the log-probabilities of both ids (log-softmax differences are logit differences).

        `prompt`: a str or a list of token ids is a raw prompt, continued without the chat
        template (what IOI-style prompts need); a list of message dicts ({role, content}) is a
        chat, sent through the template. (This differs from `chat()`, where a bare str is one
        user message: wrap it, `[{"role": "user", "content": text}]`, to measure through the
        template.) `target`, `foil`: token ids (ints; the server has no tokenize endpoint: take
        ids from a response's `token_ids` or `logprobs`, or from the model's tokenizer).
        `interventions` change the run; other keyword arguments go to `chat()`."""
        if kw.get("stream"):
            raise ValueError("logit_difference does not stream")
        t, f = _token_id(target), _token_id(foil)
        kw.setdefault("max_tokens", 1)
        kw.setdefault("temperature", 0.0)
        resp = self.chat(**_analysis_input(prompt), interventions=interventions,
                         logprob_token_ids=[t] if t == f else [t, f], **kw)
        return _logit_diff(resp, t, f)

    def patching_sweep(self, clean: Any, corrupted: Any, target: int, foil: int, *, site: str = "resid_pre",
                       layers: Iterable[int] | None = None, positions: Any = "prompt", **kw) -> PatchingResult:
        """Activation patching, layer by layer (site "head": layer by layer and head by head).

        (1) The clean prompt runs once with `site` captured at every layer into shared memory
        (one token, greedy). (2) The corrupted prompt runs unpatched, then once per layer (per
        layer and head) with that site patched from the clean capture at `positions` ("prompt"
        by default, or "all" or a list of absolute positions); each run gives logit(target) -
        logit(foil) at the first generated token. (3) The clean capture is released, also when
        a step fails. Both prompts must have the same number of tokens.

        `clean`, `corrupted`: a str or a list of token ids is a raw prompt, continued without
        the chat template (what IOI-style prompts need); a list of message dicts ({role,
        content}) is a chat, sent through the template. (This differs from `chat()`, where a
        bare str is one user message.)

        `site`: "resid_pre" | "resid_post" | "attn_out" | "mlp_out" (blocks.N.hook_<site>) or
        "head" (blocks.N.attn.hook_z, one head at a time); `layers`: default all (negative
        indices count from the end); `target`, `foil`: token ids; `kw`: more request fields
        (e.g. chat template options) sent with every request.

            client = LMStudioNeuroScopeClient("http://127.0.0.1:8080")
            clean = "When Mary and John went to the store, John gave a drink to"     # raw prompts
            corrupted = "When Mary and John went to the store, Mary gave a drink to"
            mary, john = 5099, 2322  # token ids of " Mary" and " John" (SmolLM2's vocabulary)
            res = client.patching_sweep(clean, corrupted, mary, john, site="resid_pre")
            res.clean, res.corrupted       # logit differences of the unpatched prompts
            res.normalized                 # [n_layers]: 1 = patching this layer restores clean
            heads = client.patching_sweep(clean, corrupted, mary, john, site="head")
            heads.effects.shape            # (n_layers, n_heads)
            json.dumps(heads.to_dict())
        """
        if site not in PATCH_SITES:
            raise ValueError(f"site must be one of {', '.join(PATCH_SITES)}, not {site!r}")
        t, f = _token_id(target), _token_id(foil)
        ids = [t] if t == f else [t, f]
        clean_input, corrupted_input = _analysis_input(clean), _analysis_input(corrupted)
        points = self.hook_points()
        n_layers = int(points["n_layers"])
        layer_list = _layer_indices(layers, n_layers)
        heads = None
        if site == "head":
            heads = list(range(self._n_heads(points.get("model_id"))))
        names = [PATCH_SITES[site].format(layer=i) for i in layer_list]
        greedy = dict(max_tokens=1, temperature=0.0, logprob_token_ids=ids, **corrupted_input)
        body = {**clean_input, "max_tokens": 1, "temperature": 0.0, "stream": False,
                "activations_transport": "shm", "activation_hooks": [{"layer_name": n, "hook_id": n} for n in names],
                "logprob_token_ids": ids, **kw}
        clean_resp = ChatCompletion(self.request("POST", "/v1/chat/completions/with_activations", body))
        capture_id = clean_resp["capture"]["capture_id"]
        failed = True
        try:
            clean_ld = _logit_diff(clean_resp, t, f)
            corrupted_resp = self.chat(**greedy, **kw)
            corrupted_ld = _logit_diff(corrupted_resp, t, f)
            n_clean = (clean_resp.get("usage") or {}).get("prompt_tokens")
            n_corrupted = (corrupted_resp.get("usage") or {}).get("prompt_tokens")
            if n_clean != n_corrupted:
                raise ValueError(f"the clean prompt has {n_clean} tokens and the corrupted one {n_corrupted}: "
                                 "patching needs prompts of the same length")
            effects = np.full((len(layer_list),) if heads is None else (len(layer_list), len(heads)), np.nan)
            for i, name in enumerate(names):
                for j, h in enumerate(heads if heads is not None else [None]):
                    spec = {"layer_name": name, "op": "patch", "source": {"capture_id": capture_id, "hook_id": name},
                            "positions": positions}
                    if h is not None:
                        spec["heads"] = [h]
                    resp = self.chat(interventions=[spec], **greedy, **kw)
                    effects[(i,) if h is None else (i, j)] = _logit_diff(resp, t, f)
            failed = False
        finally:
            try:
                self.release(capture_id)
            except NeuroScopeError as exc:
                # already gone (404) is fine; otherwise report it, unless an error is on its way out
                if not failed and not (isinstance(exc, NeuroScopeServerError) and exc.status == 404):
                    raise
        denom = clean_ld - corrupted_ld
        with np.errstate(divide="ignore", invalid="ignore"):
            normalized = (effects - corrupted_ld) / denom if denom != 0 else np.full_like(effects, np.nan)
        return PatchingResult(clean=clean_ld, corrupted=corrupted_ld, effects=effects, normalized=normalized,
                              site=site, layers=layer_list, heads=heads, hook_names=names, target=t, foil=f,
                              positions=positions)

    # --- attribution patching -----------------------------------------------------------------
    def attribution(self, clean: Any, corrupted: Any, metric: Any, sites: Iterable | None = None,
                    method: str = "atp", verify_top: int | None = None, *, arrow: bool = True) -> AttributionResult:
        """POST /v1/attribution (docs/attribution.md): every site's estimated effect on `metric` when the
        corrupted run gets the clean run's activation there, from one backward pass.

        `clean`, `corrupted`: raw text or token ids (no chat template), or a chat (a list of message
        dicts); both must tokenize to the same length. `metric`: `(a, b)` for logit(a) - logit(b) at the
        last position, an int `a` for log p(a), or the request's dict. `sites`: hook names or specs
        (default: every layer's attention, MLP and residual output). `method`: "atp" or "atp*".
        `verify_top`: also patch the K largest for real. `arrow`: take the answer as an Arrow stream
        (compact for many rows) rather than JSON.

            r = client.attribution("When John and Mary went to the store, John gave a drink to",
                                   "When John and Mary went to the store, Mary gave a drink to", (mary, john),
                                   verify_top=5)
            names, grid = r.matrix("residual")  # [layers, positions]
        """
        body: dict = {"clean": _one_run(clean, "clean"), "corrupted": _one_run(corrupted, "corrupted"),
                      "metric": _metric(metric), "method": method}
        specs = _hooks([sites] if isinstance(sites, (str, dict)) else sites)
        if specs is not None:
            body["sites"] = specs
        if verify_top is not None:
            body["verify_top"] = int(verify_top)
        if not arrow:
            return AttributionResult.from_json(self.request("POST", "/v1/attribution", body))
        resp = self._raw("POST", "/v1/attribution", body, headers={"Accept": ATTRIBUTION_ARROW})
        if resp.headers.get("content-type", "").startswith(ATTRIBUTION_ARROW):
            return AttributionResult.from_arrow(resp.content)
        return AttributionResult.from_json(_loads(resp.content))  # a server without Arrow answers

    def _n_heads(self, model_id: str | None) -> int:
        models = self.list_models()
        card = next((m for m in models if m.get("id") == model_id), models[0] if models else {})
        if "n_heads" not in card:
            raise NeuroScopeError(f"the model card of {model_id!r} does not say n_heads")
        return int(card["n_heads"])


def _encode_array(a: np.ndarray, dtype: str | None) -> dict:
    """A numpy vector as POST /v1/vectors' {data, dtype, shape} (exact little-endian bytes)."""
    if a.ndim not in (1, 2):
        raise ValueError(f"a vector is [n] or [heads, n], not shape {a.shape}")
    if dtype is None:
        dtype = "float16" if a.dtype == np.float16 else "bfloat16" if a.dtype.name == "bfloat16" else "float32"
    if dtype == "float32":
        raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
    elif dtype == "float16":
        raw = np.ascontiguousarray(a, dtype="<f2").tobytes()
    elif dtype == "bfloat16":
        if a.dtype.name != "bfloat16":
            raise ValueError("dtype 'bfloat16' needs a bfloat16 array (ml_dtypes); send float32 instead")
        raw = np.ascontiguousarray(a).view("<u2").tobytes()
    else:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    return {"data": base64.b64encode(raw).decode("ascii"), "dtype": dtype, "shape": list(a.shape)}


def _logit_diff(resp: ChatCompletion, target: int, foil: int) -> float:
    """logprob(target) - logprob(foil) at the first generated token of a response that asked
    for `logprob_token_ids`."""
    entries = resp.logprobs
    if not entries:
        raise NeuroScopeError("the response carries no log-probabilities (no token generated?)")
    got = {e["token_id"]: e["logprob"] for e in entries[0].get("target_logprobs") or []}
    if target not in got or foil not in got:
        missing = target if target not in got else foil
        raise NeuroScopeError(f"the response has no log-probability of token {missing}")
    return float(got[target]) - float(got[foil])


def _layer_indices(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    out = []
    for i in layers:
        i = int(i)
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(f"layer {i} is out of range: the model has {n_layers} layers")
        out.append(j)
    return out


__all__ = [
    "DEFAULT_BASE_URL",
    "ActivationResult",
    "ActivationStream",
    "ChatCompletion",
    "ChatStream",
    "LMStudioNeuroScopeClient",
    "NeuroScopeConnectionError",
    "NeuroScopeError",
    "NeuroScopeServerError",
    "PATCH_SITES",
    "PatchingResult",
    "ShmCapture",
    "StreamEvent",
    "entry_array",
    "merge_activations",
]
