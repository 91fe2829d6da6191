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

Every non-2xx answer (and every error event inside a stream) raises `NeuroScopeServerError`
with the server's status, message, type, param and code. Network failures raise
`NeuroScopeConnectionError`. Both derive from `NeuroScopeError`.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterable, Iterator

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
    """Iterate for the text deltas (str) of a streamed chat completion."""

    def __init__(self, resp: requests.Response):
        self._resp = resp
        self._events = _iter_sse(resp)
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.chunks: list[dict] = []

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self._events:
                self.chunks.append(chunk)
                self.usage = chunk.get("usage") or self.usage
                for choice in chunk.get("choices") or []:
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
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
            return self.capture
        out = self._completion({"tokens": self.tokens or [], "activations": self.activations})
        if self.usage:
            out["usage"] = self.usage
        return ActivationResult(out)

    def _completion(self, extra: dict) -> dict:
        """A chat.completion built from what the stream carried so far."""
        out = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                         "logprobs": None, "finish_reason": self.finish_reason}],
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
             timeout: Any = None) -> requests.Response:
        url = self.base_url + path
        kwargs: dict = {"timeout": self.timeout if timeout is None else timeout, "stream": stream}
        if json_body is not None:
            if orjson is not None:
                kwargs["data"] = orjson.dumps(json_body, option=orjson.OPT_SERIALIZE_NUMPY)
                kwargs["headers"] = {"Content-Type": "application/json"}
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
    def chat(self, messages: Any, max_tokens: int = 256, temperature: float = 0.7, stream: bool = False,
             **extra) -> ChatCompletion | ChatStream:
        """POST /v1/chat/completions. Returns the completion (a dict with `.text`), or with
        `stream=True` a `ChatStream` that yields the text deltas."""
        body = {"messages": _messages(messages), "max_tokens": max_tokens, "temperature": temperature,
                "stream": bool(stream), **extra}
        if stream:
            return ChatStream(self._raw("POST", "/v1/chat/completions", body, stream=True))
        return ChatCompletion(self.request("POST", "/v1/chat/completions", body))

    def generate_with_activations(self, messages: Any, activation_hooks: Iterable | None = None,
                                  max_tokens: int = 100, temperature: float = 0.7, stream: bool = False,
                                  transport: str = "inline", *, encoding: str | None = None,
                                  positions: str | None = None, dtype: str | None = None,
                                  **extra) -> "ActivationResult | ShmCapture | ActivationStream":
        """POST /v1/chat/completions/with_activations.

        `activation_hooks`: [{layer_name, component, hook_id?, capture_input?, capture_output?}]
        (or TransformerLens names as strings); None uses the hooks registered on the server.
        `transport`: "inline" -> `ActivationResult` (the response dict); "shm" -> an open
        `ShmCapture` (zero-copy arrays; close it). `stream=True` -> an `ActivationStream` of
        `StreamEvent`s. `encoding` ("json" | "base64"), `positions` ("all" | "last" | "prompt" |
        "generated") and `dtype` ("float32" | "float16" | "bfloat16") map to the request fields
        activations_encoding, activation_positions and activation_dtype; other keyword
        arguments (seed, top_p, stop, ...) are sent as they are."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        body: dict = {"messages": _messages(messages), "max_tokens": max_tokens, "temperature": temperature,
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
    "ShmCapture",
    "StreamEvent",
    "entry_array",
    "merge_activations",
]
