"""The control plane through real HTTP on loopback against a real uvicorn server (tiny model).

Every endpoint of the API (the table in README.md) and issue 5, the `openai` package unchanged, inline data
equal to the shared-memory data for the same greedy request, streaming with activations, every
error as JSON `{"error": {message, type, param, code}}` (the server keeps serving after each),
HTTP/1.0 `Connection: close`, and the OpenAPI document kept true against the app's routes.
Configuration variants (API key, CORS, queue size, budgets, TTL, no model) live in
test_server_config.py; the soak in test_server_soak.py.
"""

from __future__ import annotations

import re

import base64
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests

from shm import open_capture, read_capture_bytes

ROOT = Path(__file__).resolve().parents[1]
ARROW_STREAM = "application/vnd.apache.arrow.stream"
# Greedy on the tiny random llama: this prompt generates several tokens before its end token
# ("Hello" ends at once), so streams have more than one content chunk.
PROMPT = "John gave Mary"


# --- helpers (imported by the other test_server modules) ---------------------------------------
def chat_body(content: str = PROMPT, max_tokens: int = 5, **extra) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def assert_error(r: requests.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The error shape every failure must have; returns the inner object."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["code"], str) and err["code"]
    assert err["param"] is None or isinstance(err["param"], str)
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_serving(base: str) -> None:
    """The server still answers health and a real generation."""
    assert requests.get(base + "/health", timeout=10).json()["status"] == "ok"
    r = requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def sse_events(r: requests.Response) -> list:
    """Parse an SSE body into JSON objects; the `[DONE]` sentinel comes back as the string."""
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/event-stream")
    out = []
    for line in r.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: "), line
        payload = line[len(b"data: "):]
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def entry_array(entry: dict) -> np.ndarray:
    a = np.asarray(entry["data"], dtype=np.float32)
    assert list(a.shape) == entry["shape"], (a.shape, entry["shape"])
    return a


def inline_by_step(activations: dict) -> dict:
    """{(hook_id, is_input, step): array} from inline entries."""
    out = {}
    for hook_id, entries in activations.items():
        for e in entries:
            assert e["hook_id"] == hook_id
            key = (hook_id, e["is_input"], e["step"])
            assert key not in out, key
            out[key] = entry_array(e)
    return out


def live_captures(base: str, headers: dict | None = None) -> list:
    return requests.get(base + "/v1/activations", headers=headers, timeout=10).json()["segments"]


# Hooks over every component and all three name vocabularies. Q/K/V, scores and patterns come
# inline head-major ([H, T, ...]) and in shm token-major ([T, H, ...]).
ALL_HOOKS = [
    {"layer_name": "transformer.wte", "component": "embedding", "hook_id": "emb"},
    {"layer_name": "transformer.h.0", "component": "residual", "hook_id": "resid0"},
    {"layer_name": "model.layers.1", "component": "attention", "hook_id": "attn1"},
    {"layer_name": "model.layers.1", "component": "mlp", "hook_id": "mlp1"},
    {"layer_name": "transformer.h.2", "component": "layernorm", "hook_id": "ln2"},
    {"layer_name": "transformer.h.2", "component": "query", "hook_id": "q2"},
    {"layer_name": "transformer.h.2", "component": "key", "hook_id": "k2"},
    {"layer_name": "transformer.h.2", "component": "value", "hook_id": "v2"},
    {"layer_name": "transformer.h.1", "component": "attention_scores", "hook_id": "scores1"},
    {"layer_name": "transformer.h.1", "component": "attention_pattern", "hook_id": "pattern1"},
    {"layer_name": "blocks.2.hook_resid_post", "hook_id": "tl_resid2"},
    {"layer_name": "blocks.0.attn.hook_pattern"},  # default hook id: the TransformerLens name
]
HEAD_MAJOR = {"query", "key", "value", "attention_scores", "attention_pattern"}


def shm_step(view, hook_id: str, step: int, component: str) -> np.ndarray:
    a = np.array(view[hook_id].for_step(step), dtype=np.float32)
    return a.transpose(1, 0, 2) if component in HEAD_MAJOR else a


def assert_same(shm: np.ndarray, inline: np.ndarray, msg: str = "") -> None:
    """Inline JSON cannot carry -inf (masked attention scores): orjson writes null, read as nan."""
    assert shm.shape == inline.shape, (msg, shm.shape, inline.shape)
    holes = np.isnan(inline)
    np.testing.assert_array_equal(np.isneginf(shm), holes, err_msg=msg)
    np.testing.assert_array_equal(shm[~holes], inline[~holes], err_msg=msg)


@pytest.fixture
def base(tiny_server) -> str:
    return tiny_server.base_url


@pytest.fixture
def clean_hooks(base):
    requests.delete(base + "/v1/activations/hooks", timeout=10)
    yield
    requests.delete(base + "/v1/activations/hooks", timeout=10)


# --- models ---------------------------------------------------------------------------------
def test_health(base):
    r = requests.get(base + "/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_loaded"] is True and body["model_id"] == "tiny-llama"
    assert isinstance(body["queued"], int)


def test_models_list(base):
    body = requests.get(base + "/v1/models", timeout=10).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == "tiny-llama" and card["object"] == "model"
    assert card["supports_activations"] is True
    assert card["n_layers"] == 3 and card["d_model"] == 64


def test_load_model_contract_fields(base, tiny_llama_path):
    """`{"model_path", "model_id"?}` (README.md's endpoint table) answers `{"model_id", "status": "loaded",
    "supports_activations": true, ...}` (reloads the same tiny model under its own id)."""
    r = requests.post(base + "/v1/models/load", json={"model_path": str(tiny_llama_path), "model_id": "tiny-llama"},
                      timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == "tiny-llama"
    assert body["status"] == "loaded"
    assert body["supports_activations"] is True
    assert requests.get(base + "/health", timeout=10).json()["model_id"] == "tiny-llama"
    assert_serving(base)


def test_load_model_outside_allowed_dirs_is_forbidden(base, tiny_llama_path):
    # tiny_server allows the pytest base temp dir; /tmp itself and a copy of the model there are outside.
    import shutil
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="nsb-outside-"))
    try:
        shutil.copytree(tiny_llama_path, outside / "model")
        for path in (str(outside / "model"), "/etc", "../../../../../etc/passwd", str(outside / "model" / ".."),
                     f"{tiny_llama_path}/../../../../{outside.name}/model"):
            err = assert_error(requests.post(base + "/v1/models/load", json={"model_path": path}, timeout=30),
                               403, "model_path_forbidden", "model_path")
            assert "--allow-model-dir" in err["message"]
    finally:
        shutil.rmtree(outside)
    for path in ():
        err = assert_error(requests.post(base + "/v1/models/load", json={"model_path": path}, timeout=30),
                           403, "model_path_forbidden", "model_path")
        assert "--allow-model-dir" in err["message"]
    assert requests.get(base + "/health", timeout=10).json()["model_id"] == "tiny-llama"
    assert_serving(base)


def test_load_model_bad_bodies(base):
    assert_error(requests.post(base + "/v1/models/load", json={}, timeout=10), 400, param="model_path")
    assert_error(requests.post(base + "/v1/models/load", json={"model_path": 5}, timeout=30), 400)
    assert_error(requests.post(base + "/v1/models/load", data=b"{oops", headers=JSON, timeout=10), 400, "malformed_request")
    assert_serving(base)


# --- chat -----------------------------------------------------------------------------------
def test_chat_non_stream(base):
    r = requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=6), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-llama"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 6


def test_chat_greedy_is_deterministic(base):
    a = requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=8), timeout=30).json()
    b = requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=8), timeout=30).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]


def test_chat_max_tokens_is_honoured(base):
    body = requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=3), timeout=30).json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


def test_chat_stream(base):
    r = requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=6, stream=True), stream=True,
                      timeout=30)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert not any("usage" in c for c in chunks)  # only with stream_options.include_usage
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    full = requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=6), timeout=30).json()
    assert text == full["choices"][0]["message"]["content"]


def test_chat_stream_include_usage(base):
    r = requests.post(base + "/v1/chat/completions",
                      json=chat_body(max_tokens=4, stream=True, stream_options={"include_usage": True}),
                      stream=True, timeout=30)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_openai_package_non_stream_and_stream(base):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}]
    resp = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=5, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [resp.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens

    plain = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=3, temperature=0, stream=True)
    assert [c.choices[0].finish_reason for c in plain if c.choices][-1] in ("stop", "length")

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=0)
    assert exc.value.body["param"] == "max_tokens" or exc.value.body.get("error", {}).get("param") == "max_tokens"


# --- with_activations -----------------------------------------------------------------------
def test_with_activations_contract_request(base):
    """The request and response of README.md and docs/activations.md, copied as NeuroScope writes them."""
    body = {
        "messages": [{"role": "user", "content": "The capital of France is"}],
        "max_tokens": 3,
        "temperature": 0.0,
        "stream": False,
        "activation_hooks": [
            {"layer_name": "transformer.h.1", "component": "residual", "hook_id": "resid_1",
             "capture_input": False, "capture_output": True},
            {"layer_name": "transformer.h.0", "component": "attention_pattern"},
        ],
    }
    r = requests.post(base + "/v1/chat/completions/with_activations", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    acts = out["activations"]
    assert set(acts) == {"resid_1", "transformer.h.0.attention_pattern"}
    n_positions = out["usage"]["total_tokens"]
    for hook_id, entries in acts.items():
        assert entries, hook_id
        for e in entries:
            assert {"hook_id", "layer_name", "component", "shape", "dtype", "is_input", "data"} <= set(e)
            assert e["hook_id"] == hook_id and e["dtype"] == "float32" and e["is_input"] is False
            a = entry_array(e)
            assert np.isfinite(a).all() or e["component"] == "attention_scores"
    resid = acts["resid_1"]
    assert resid[0]["layer_name"] == "transformer.h.1" and resid[0]["component"] == "residual"
    # Prompt (step 0) and every generated token, with the KV cache: decode steps see one token.
    assert sum(e["shape"][0] for e in resid) == n_positions
    assert [e["step"] for e in resid] == list(range(len(resid)))
    assert all(e["shape"] == [1, 64] for e in resid[1:])
    pats = acts["transformer.h.0.attention_pattern"]
    prompt_len = out["usage"]["prompt_tokens"]
    assert pats[0]["shape"] == [4, prompt_len, prompt_len]
    for k, e in enumerate(pats[1:], start=1):
        assert e["shape"] == [4, 1, prompt_len + k]  # T_q = 1, T_k = all positions so far
        p = entry_array(e)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)


def test_with_activations_capture_input_and_output(base):
    body = chat_body(max_tokens=2, activation_hooks=[
        {"layer_name": "transformer.h.1", "component": "residual", "hook_id": "r1",
         "capture_input": True, "capture_output": True}])
    out = requests.post(base + "/v1/chat/completions/with_activations", json=body, timeout=60).json()
    entries = out["activations"]["r1"]
    by = inline_by_step(out["activations"])
    steps = sorted({e["step"] for e in entries})
    for s in steps:
        assert ("r1", True, s) in by and ("r1", False, s) in by
    # Input before output within a step; the block input of layer 1 is the output of layer 0.
    assert [e["is_input"] for e in entries[:2]] == [True, False]
    l0 = requests.post(base + "/v1/chat/completions/with_activations", json=chat_body(max_tokens=2, activation_hooks=[
        {"layer_name": "blocks.0.hook_resid_post", "hook_id": "r0"}]), timeout=60).json()
    for s in steps:
        np.testing.assert_array_equal(inline_by_step(l0["activations"])[("r0", False, s)], by[("r1", True, s)])


def test_with_activations_names_resolve_to_the_same_tensor(base):
    """NeuroScope, mlx-lm and TransformerLens names of one tensor give identical data."""
    hooks = [
        {"layer_name": "transformer.h.1", "component": "residual", "hook_id": "gpt2"},
        {"layer_name": "model.layers.1", "component": "residual", "hook_id": "own"},
        {"layer_name": "blocks.1.hook_resid_post", "hook_id": "tl"},
    ]
    out = requests.post(base + "/v1/chat/completions/with_activations",
                        json=chat_body(max_tokens=2, activation_hooks=hooks), timeout=60).json()
    acts = out["activations"]
    for a, b in zip(acts["gpt2"], acts["own"]):
        np.testing.assert_array_equal(entry_array(a), entry_array(b))
    for a, b in zip(acts["gpt2"], acts["tl"]):
        np.testing.assert_array_equal(entry_array(a), entry_array(b))


def test_with_activations_base64_equals_json(base):
    hooks = [{"layer_name": "transformer.h.0", "component": "mlp", "hook_id": "m"}]
    js = requests.post(base + "/v1/chat/completions/with_activations",
                       json=chat_body(max_tokens=2, activation_hooks=hooks), timeout=60).json()
    b64 = requests.post(base + "/v1/chat/completions/with_activations",
                        json=chat_body(max_tokens=2, activation_hooks=hooks, activations_encoding="base64"),
                        timeout=60).json()
    for a, b in zip(js["activations"]["m"], b64["activations"]["m"]):
        raw = np.frombuffer(base64.b64decode(b["data_base64"]), dtype="<f4").reshape(b["shape"])
        np.testing.assert_array_equal(entry_array(a), raw)


def test_inline_equals_shm_for_the_same_greedy_request(base):
    body = chat_body(max_tokens=4, activation_hooks=ALL_HOOKS)
    inline = requests.post(base + "/v1/chat/completions/with_activations", json=body, timeout=60)
    assert inline.status_code == 200, inline.text
    inline = inline.json()
    shm = requests.post(base + "/v1/chat/completions/with_activations",
                        json={**body, "activations_transport": "shm"}, timeout=60)
    assert shm.status_code == 200, shm.text
    shm = shm.json()
    assert shm["token_ids"] == inline["token_ids"] and shm["tokens"] == inline["tokens"]
    assert shm["choices"][0]["message"] == inline["choices"][0]["message"]
    handle = shm["capture"]["handle"]
    capture_id = shm["capture"]["capture_id"]
    assert handle["capture_id"] == capture_id and handle["format"] == "arrow-ipc-stream"
    assert set(shm["activations"]) == set(inline["activations"])
    for hook_id, entries in shm["activations"].items():
        for e in entries:
            assert "data" not in e and e["handle"] == handle
            assert {"hook_id", "layer_name", "component", "shape", "dtype", "is_input"} <= set(e)
    assert capture_id in {s["capture_id"] for s in live_captures(base)}

    by = inline_by_step(inline["activations"])
    try:
        with open_capture(handle) as view:
            assert view.capture_id == capture_id and view.token_ids == inline["token_ids"]
            compared = 0
            for (hook_id, is_input, step), want in by.items():
                component = inline["activations"][hook_id][0]["component"]
                assert_same(shm_step(view, hook_id, step, component), want, f"{hook_id} step {step}")
                compared += 1
            assert compared == len(by) and compared >= len(ALL_HOOKS) * 4

        # The same bytes over HTTP, for consumers on another host.
        r = requests.get(f"{base}/v1/activations/{capture_id}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == ARROW_STREAM
        assert len(r.content) == handle["byte_size"]
        table = pa.ipc.open_stream(pa.BufferReader(r.content)).read_all()
        assert {"step", "position", "token_id", "resid0", "pattern1"} <= set(table.column_names)
        with read_capture_bytes(r.content) as view:
            np.testing.assert_array_equal(shm_step(view, "resid0", 0, "residual"), by[("resid0", False, 0)])
    finally:
        r = requests.delete(f"{base}/v1/activations/{capture_id}", timeout=10)
    assert r.status_code == 200 and r.json() == {"capture_id": capture_id, "status": "released"}
    assert capture_id not in {s["capture_id"] for s in live_captures(base)}
    assert_error(requests.get(f"{base}/v1/activations/{capture_id}", timeout=10), 404, "not_found")
    assert_error(requests.delete(f"{base}/v1/activations/{capture_id}", timeout=10), 404, "not_found")


def test_shm_capture_input_and_output_of_one_hook(base):
    """A hook that captures both directions shares one hook_id: the Arrow stream must still be readable."""
    body = chat_body(max_tokens=2, activations_transport="shm", activation_hooks=[
        {"layer_name": "transformer.h.1", "component": "residual", "hook_id": "r1", "capture_input": True}])
    r = requests.post(base + "/v1/chat/completions/with_activations", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    cid = out["capture"]["capture_id"]
    try:
        assert sorted(e["is_input"] for e in out["activations"]["r1"]) == [False, True]
        data = requests.get(f"{base}/v1/activations/{cid}", timeout=30).content
        table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
        assert table.num_rows == out["usage"]["total_tokens"]
        with open_capture(out["capture"]["handle"]) as view:
            assert sorted(h.info.is_input for h in view) == [False, True]
    finally:
        requests.post(f"{base}/v1/activations/{cid}/release", timeout=10)


def test_release_post_twin(base):
    body = chat_body(max_tokens=2, activations_transport="shm",
                     activation_hooks=[{"layer_name": "transformer.h.0", "component": "residual"}])
    out = requests.post(base + "/v1/chat/completions/with_activations", json=body, timeout=60).json()
    cid = out["capture"]["capture_id"]
    name = out["capture"]["handle"]["name"]
    assert Path("/dev/shm", name).exists()
    r = requests.post(f"{base}/v1/activations/{cid}/release", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "released"
    assert_error(requests.post(f"{base}/v1/activations/{cid}/release", timeout=10), 404, "not_found")
    assert cid not in {s["capture_id"] for s in live_captures(base)}


def test_list_captures_shape(base):
    body = requests.get(base + "/v1/activations", timeout=10).json()
    assert {"budget_bytes", "live_bytes", "segments", "ttl_s"} <= set(body)
    assert isinstance(body["segments"], list)


def test_stream_with_inline_activations_carries_each_step(base):
    hooks = [{"layer_name": "transformer.h.1", "component": "residual", "hook_id": "r"},
             {"layer_name": "transformer.h.0", "component": "attention_pattern", "hook_id": "p"}]
    body = chat_body(max_tokens=5, activation_hooks=hooks)
    full = requests.post(base + "/v1/chat/completions/with_activations", json=body, timeout=60).json()
    r = requests.post(base + "/v1/chat/completions/with_activations", json={**body, "stream": True}, stream=True,
                      timeout=60)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "activations" not in chunks[0]  # the role chunk
    content = chunks[1:]
    assert content[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert content[-1]["tokens"] == full["tokens"]
    seen: dict = {}
    for i, c in enumerate(content):
        steps = {e["step"] for entries in c["activations"].values() for e in entries}
        if i < len(content) - 1:
            assert steps == {i}, (i, steps)  # the token of chunk i came from step i
        else:
            assert steps == {i, i + 1} or steps == {i}, steps  # the last one also brings the final step
        for key, a in inline_by_step(c["activations"]).items():
            assert key not in seen
            seen[key] = a
    want = inline_by_step(full["activations"])
    assert set(seen) == set(want)
    for key, a in want.items():
        np.testing.assert_array_equal(seen[key], a, err_msg=str(key))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == full["choices"][0]["message"]["content"]


def test_stream_with_shm_final_chunk_has_the_handle(base):
    hooks = [{"layer_name": "transformer.h.2", "component": "mlp", "hook_id": "m"}]
    body = chat_body(max_tokens=4, activation_hooks=hooks, stream=True, activations_transport="shm",
                     stream_options={"include_usage": True})
    inline = requests.post(base + "/v1/chat/completions/with_activations",
                           json={**body, "stream": False, "activations_transport": "inline"}, timeout=60).json()
    events = sse_events(requests.post(base + "/v1/chat/completions/with_activations", json=body, stream=True,
                                      timeout=60))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    chunks = events[:-2]
    with_handle = [c for c in chunks if "capture" in c]
    assert len(with_handle) == 1 and with_handle[0] is chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    cap = chunks[-1]["capture"]
    try:
        with open_capture(cap["handle"]) as view:
            for (hook_id, _, step), a in inline_by_step(inline["activations"]).items():
                np.testing.assert_array_equal(shm_step(view, hook_id, step, "mlp"), a)
    finally:
        assert requests.delete(f"{base}/v1/activations/{cap['capture_id']}", timeout=10).status_code == 200


def test_concurrent_mixed_requests_each_get_their_own_result(base):
    """Requests decode together in the batch; shm writes overlap later steps. Every answer is the
    one a request would get alone: the same tokens, activations within float32 rounding (a
    batched matmul may sum in another order; see tests/test_batching.py)."""
    from concurrent.futures import ThreadPoolExecutor

    hooks = [{"layer_name": "transformer.h.1", "component": "residual", "hook_id": "r"},
             {"layer_name": "transformer.h.2", "component": "attention_pattern", "hook_id": "p"}]
    prompts = ["John gave Mary", "What is the answer?", "Hi", "The capital of France is"]
    want = {p: inline_by_step(requests.post(base + ACT, json=chat_body(p, max_tokens=6, activation_hooks=hooks),
                                            timeout=60).json()["activations"]) for p in prompts}

    def one(i):
        prompt = prompts[i % len(prompts)]
        shm = i % 2 == 1
        transport = {"activations_transport": "shm"} if shm else {}
        body = chat_body(prompt, max_tokens=6, activation_hooks=hooks, **transport)
        r = requests.post(base + ACT, json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        if not shm:
            got = inline_by_step(out["activations"])
        else:
            got = {}
            try:
                with open_capture(out["capture"]["handle"]) as view:
                    for hook_id, step_ in {(k[0], k[2]) for k in want[prompt]}:
                        comp = "residual" if hook_id == "r" else "attention_pattern"
                        got[(hook_id, False, step_)] = shm_step(view, hook_id, step_, comp)
            finally:
                requests.delete(f"{base}/v1/activations/{out['capture']['capture_id']}", timeout=10)
        assert set(got) == set(want[prompt])
        for key, a in want[prompt].items():
            finite = np.isfinite(a)
            np.testing.assert_array_equal(np.isfinite(got[key]), finite, err_msg=f"{prompt} {key}")
            np.testing.assert_allclose(got[key][finite], a[finite], rtol=0, atol=1e-5 * np.abs(a[finite]).max(),
                                       err_msg=f"{prompt} {key}")
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(24)))
    assert requests.get(base + "/health", timeout=10).json()["queued"] == 0


# --- hooks ----------------------------------------------------------------------------------
def test_hooks_register_list_use_and_clear(base, clean_hooks):
    hooks = [{"layer_name": "transformer.h.0", "component": "residual", "hook_id": "reg_resid"},
             {"layer_name": "blocks.1.attn.hook_pattern", "hook_id": "reg_pat"}]
    r = requests.post(base + "/v1/activations/hooks", json={"hooks": hooks}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 2
    listed = requests.get(base + "/v1/activations/hooks", timeout=10).json()
    assert listed["count"] == 2 and listed["hooks"] == hooks

    # A request that names no hooks (absent or empty) uses the registered ones.
    for extra in ({}, {"activation_hooks": []}):
        out = requests.post(base + "/v1/chat/completions/with_activations", json=chat_body(max_tokens=2, **extra),
                            timeout=60).json()
        assert set(out["activations"]) == {"reg_resid", "reg_pat"}
    # A request that names hooks uses its own.
    out = requests.post(base + "/v1/chat/completions/with_activations", json=chat_body(
        max_tokens=2, activation_hooks=[{"layer_name": "transformer.h.2", "component": "mlp", "hook_id": "own"}]),
        timeout=60).json()
    assert set(out["activations"]) == {"own"}
    # Plain chat ignores them.
    assert "activations" not in requests.post(base + "/v1/chat/completions", json=chat_body(max_tokens=2),
                                              timeout=30).json()

    r = requests.delete(base + "/v1/activations/hooks", timeout=10)
    assert r.status_code == 200 and r.json()["cleared"] == 2
    assert requests.get(base + "/v1/activations/hooks", timeout=10).json() == {"hooks": [], "count": 0}
    assert_error(requests.post(base + "/v1/chat/completions/with_activations", json=chat_body(max_tokens=2),
                               timeout=30), 400, param="activation_hooks")

    # The POST twin for SqueakJS.
    requests.post(base + "/v1/activations/hooks", json={"hooks": hooks[:1]}, timeout=10)
    r = requests.post(base + "/v1/activations/hooks/clear", timeout=10)
    assert r.status_code == 200 and r.json()["cleared"] == 1
    assert requests.get(base + "/v1/activations/hooks", timeout=10).json()["count"] == 0


def test_hooks_register_rejects_bad_hooks_and_keeps_old_ones(base, clean_hooks):
    good = [{"layer_name": "transformer.h.0", "component": "residual", "hook_id": "keep"}]
    assert requests.post(base + "/v1/activations/hooks", json={"hooks": good}, timeout=10).status_code == 200
    err = assert_error(requests.post(base + "/v1/activations/hooks", json={"hooks": [
        {"layer_name": "transformer.h.0", "component": "mlp"},
        {"layer_name": "transformer.h.99", "component": "residual"}]}, timeout=10), 400, "unknown_hook",
        param="hooks[1].layer_name")  # the field of this endpoint, not activation_hooks[...]
    assert "0 to 2" in err["message"] and err["message"].startswith("hooks[1]")
    assert_error(requests.post(base + "/v1/activations/hooks", json={"hooks": "residual"}, timeout=10), 400)
    assert_error(requests.post(base + "/v1/activations/hooks", json={}, timeout=10), 400)
    assert_error(requests.post(base + "/v1/activations/hooks", data=b"[]", headers=JSON, timeout=10), 400, "malformed_request")
    assert requests.get(base + "/v1/activations/hooks", timeout=10).json()["hooks"] == good
    assert_serving(base)


def test_points(base):
    body = requests.get(base + "/v1/activations/points", timeout=10).json()
    assert body["model_id"] == "tiny-llama" and body["n_layers"] == 3
    names = {p["name"] for p in body["points"]}
    assert {"hook_embed", "blocks.0.hook_resid_post", "blocks.2.attn.hook_pattern", "ln_final.hook_normalized"} <= names
    # Every listed point can be captured by its name.
    sample = [p for p in body["points"] if p["name"] in ("hook_embed", "blocks.1.hook_mlp_out", "blocks.2.attn.hook_k")]
    out = requests.post(base + "/v1/chat/completions/with_activations", json=chat_body(
        max_tokens=1, activation_hooks=[{"layer_name": p["name"]} for p in sample]), timeout=60)
    assert out.status_code == 200, out.text
    acts = out.json()["activations"]
    for p in sample:
        e = acts[p["name"]][0]
        assert e["component"] == p["component"]
        per_token = e["shape"][1:] if p["component"] not in HEAD_MAJOR else [e["shape"][0], e["shape"][2]]
        assert per_token == p["shape_per_token"]


# --- errors ---------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
ACT = "/v1/chat/completions/with_activations"
HOOK = [{"layer_name": "transformer.h.0", "component": "residual"}]


@pytest.mark.parametrize("path", [CHAT, ACT, "/v1/models/load", "/v1/activations/hooks"])
@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b"null", b"{\"a\": 1"])
def test_malformed_body_is_400(base, path, data):
    r = requests.post(base + path, data=data, headers={"Content-Type": "application/json"}, timeout=10)
    assert_error(r, 400, "malformed_request")


@pytest.mark.parametrize("path,fields,param", [
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_tokens": -3}, "max_tokens"),
    (CHAT, {"max_tokens": "10"}, "max_tokens"),
    (CHAT, {"max_tokens": 2.5}, "max_tokens"),
    (CHAT, {"max_tokens": False}, "max_tokens"),
    (CHAT, {"temperature": -1}, "temperature"),
    (CHAT, {"temperature": "hot"}, "temperature"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"top_p": 1.5}, "top_p"),
    (CHAT, {"top_k": -1}, "top_k"),
    (CHAT, {"stream": "yes"}, "stream"),
    (CHAT, {"stream": 1}, "stream"),
    (CHAT, {"stream": True, "stream_options": "yes"}, "stream_options"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": None}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, None),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, None),
    (CHAT, {"n": 2}, "n"),
    (CHAT, {"stop": [""]}, "stop[0]"),
    (CHAT, {"seed": "x"}, "seed"),
    (CHAT, {"seed": -1}, "seed"),
    (CHAT, {"max_tokens": None, "max_completion_tokens": 0}, "max_completion_tokens"),
    (ACT, {"activation_hooks": HOOK, "activations_transport": "x"}, "activations_transport"),
    (ACT, {"activation_hooks": HOOK, "activations_encoding": "x"}, "activations_encoding"),
    (ACT, {"activation_hooks": HOOK, "activation_positions": "x"}, "activation_positions"),
    (ACT, {"activation_hooks": HOOK, "activation_dtype": "int8"}, "activation_dtype"),
    (ACT, {"activation_hooks": "transformer.h.0"}, "activation_hooks"),
    (ACT, {"activation_hooks": [5]}, None),
    (ACT, {"activation_hooks": [{"component": "residual"}]}, None),
    (ACT, {"activation_hooks": [{**HOOK[0], "capture_output": False}]}, None),
    (ACT, {"activation_hooks": [{**HOOK[0], "capture_input": "yes"}]}, None),
    (ACT, {"activation_hooks": [{**HOOK[0], "hook_id": 7}]}, None),
    (ACT, {"activation_hooks": [{**HOOK[0], "hook_id": "a"}, {**HOOK[0], "hook_id": "a"}]}, None),
    (ACT, {"activation_hooks": HOOK, "max_tokens": 0}, "max_tokens"),
    (ACT, {"activation_hooks": HOOK, "stream": "yes"}, "stream"),
])
def test_invalid_field_is_400(base, path, fields, param):
    r = requests.post(base + path, json={**chat_body(max_tokens=2), **fields}, timeout=30)
    assert_error(r, 400, param=param)


ODD_BUT_VALID = [
    (CHAT, {"max_tokens": 10**15}),  # clipped to the context
    (CHAT, {"max_tokens": None, "max_completion_tokens": 2}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    (CHAT, {"stream": True, "stream_options": None}),
    (CHAT, {"seed": 2**63, "temperature": 1.0}),
    (CHAT, {"logprobs": False, "presence_penalty": 0, "user": "u", "unknown_field": {"x": 1}}),
    (CHAT, {"stop": "\n"}),
    (ACT, {"activation_hooks": [{**HOOK[0], "hook_id": "step"}], "activations_transport": "shm"}),
    (ACT, {"activation_hooks": [{**HOOK[0], "hook_id": "résidu ☃"}], "activations_transport": "shm"}),
    (ACT, {"activation_hooks": HOOK, "activations_transport": "shm", "activation_positions": "last"}),
    (ACT, {"activation_hooks": HOOK, "activations_transport": "shm", "activation_positions": "generated"}),
    (ACT, {"activation_hooks": HOOK, "activation_positions": "prompt"}),
    (ACT, {"activation_hooks": HOOK, "activations_transport": "shm", "activation_dtype": "bfloat16"}),
    (ACT, {"activation_hooks": HOOK, "activation_dtype": "bfloat16"}),
    (ACT, {"activation_hooks": HOOK, "activation_dtype": "float16", "activations_encoding": "base64"}),
    (ACT, {"activation_hooks": [{**HOOK[0], "hook_id": f"h{i}"} for i in range(300)], "max_tokens": 1}),
]


@pytest.mark.parametrize("path,fields", ODD_BUT_VALID)
def test_odd_but_valid_requests_never_fail_the_server(base, path, fields):
    r = requests.post(base + path, json={**chat_body(max_tokens=2), **fields}, timeout=60)
    assert r.status_code < 500, r.text[:1000]
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif fields.get("activations_transport") == "shm":
        cap = r.json()["capture"]
        try:
            with open_capture(cap["handle"]) as view:
                assert len(view) == 1
        finally:
            assert requests.delete(f"{base}/v1/activations/{cap['capture_id']}", timeout=10).status_code == 200
    elif fields.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]")


def test_invalid_fields_leave_the_server_serving(base):
    for fields in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stream": "yes"}, {"messages": []}):
        assert_error(requests.post(base + CHAT, json={**chat_body(), **fields}, timeout=30), 400)
    assert_serving(base)


@pytest.mark.parametrize("hook,must_list", [
    ({"layer_name": "transformer.h.99", "component": "residual"}, ["0 to 2"]),
    ({"layer_name": "model.layers.3", "component": "mlp"}, ["0 to 2"]),
    ({"layer_name": "encoder.block.1", "component": "residual"}, ["transformer.h.N", "model.layers.N", "blocks.N"]),
    ({"layer_name": "transformer.h.1", "component": "flux"}, ["residual", "attention_pattern", "query"]),
    ({"layer_name": "blocks.1.hook_resid_postt"}, ["hook_resid_post"]),
    ({"layer_name": "transformer.h.1.mlp", "component": "query"}, ["mlp"]),
])
def test_unknown_layer_or_component_is_400_listing_valid_ones(base, hook, must_list):
    r = requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=[hook]), timeout=30)
    err = assert_error(r, 400, "unknown_hook")
    for text in must_list:
        assert text in err["message"], (text, err["message"])
    assert err["param"] and ("layer_name" in err["param"] or "component" in err["param"])


def test_unknown_hook_with_shm_and_stream_is_400_before_anything_streams(base):
    before = {s["capture_id"] for s in live_captures(base)}
    for extra in ({"stream": True}, {"activations_transport": "shm"}, {"stream": True, "activations_transport": "shm"}):
        r = requests.post(base + ACT, json=chat_body(activation_hooks=[{"layer_name": "nope", "component": "mlp"}],
                                                      **extra), timeout=30)
        assert_error(r, 400, "unknown_hook")
    assert {s["capture_id"] for s in live_captures(base)} == before
    assert_serving(base)


def test_context_length_exceeded_is_an_error(base):
    r = requests.post(base + CHAT, json=chat_body(content="The capital of France is Paris. " * 60), timeout=30)
    err = assert_error(r, 400, "context_length_exceeded", "messages")
    assert "context" in err["message"]
    assert_serving(base)


@pytest.mark.parametrize("method,path", [
    ("GET", "/v2/chat"), ("GET", "/nope"), ("POST", "/v1/activations/x/y/z"), ("GET", "/v1/models/load/extra"),
])
def test_unknown_route_is_404(base, method, path):
    assert_error(requests.request(method, base + path, timeout=10), 404)


@pytest.mark.parametrize("method,path", [
    ("GET", CHAT), ("PUT", CHAT), ("GET", ACT), ("POST", "/health"), ("DELETE", "/v1/models"),
    ("GET", "/v1/models/load"), ("PUT", "/v1/activations/hooks"), ("POST", "/v1/activations"),
    ("GET", "/v1/activations/cap_0000000000000000/release"), ("GET", "/v1/activations/hooks/clear"),
])
def test_wrong_method_is_405(base, method, path):
    r = requests.request(method, base + path, timeout=10)
    assert_error(r, 405)
    assert "allow" in {k.lower() for k in r.headers}


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/activations/cap_0000000000000000"), ("DELETE", "/v1/activations/cap_0000000000000000"),
    ("POST", "/v1/activations/cap_0000000000000000/release"), ("GET", "/v1/activations/..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/v1/activations/nsb_000000000000000000000000"),
])
def test_unknown_capture_is_404(base, method, path):
    assert_error(requests.request(method, base + path, timeout=10), 404, "not_found")


def test_errors_do_not_stop_the_server(base):
    """A burst of every kind of bad request, then a normal one."""
    bad = [
        ("POST", CHAT, {"data": b"{"}), ("POST", CHAT, {"json": {"messages": []}}),
        ("POST", ACT, {"json": chat_body(activation_hooks=[{"layer_name": "x", "component": "y"}])}),
        ("GET", "/v1/activations/cap_missing", {}), ("PATCH", "/health", {}), ("GET", "/missing", {}),
        ("POST", CHAT, {"data": b"\x00" * 10000}), ("POST", CHAT, {"json": {"messages": [{"role": "user"}]}}),
        ("POST", ACT, {"json": {"messages": [{"role": "user", "content": "x"}], "activation_hooks": [{}] * 50}}),
    ]
    for method, path, kw in bad * 3:
        r = requests.request(method, base + path, timeout=30, **kw)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
        assert_error(r, r.status_code)
    assert_serving(base)


# --- HTTP details ---------------------------------------------------------------------------
def _raw_http(port: int, request: bytes, timeout: float = 30.0) -> tuple[bytes, bytes, bool]:
    """Send one raw request; read until the server closes the connection (a server that kept it
    open would hit the socket timeout instead). Returns (head, body, closed_by_server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body, True


def test_http10_connection_close(tiny_server):
    port = tiny_server.port
    head, body, closed = _raw_http(port, b"GET /health HTTP/1.0\r\nConnection: close\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"200", head
    assert closed and json.loads(body)["status"] == "ok"

    payload = json.dumps(chat_body(max_tokens=3)).encode()
    req = (b"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    head, body, _ = _raw_http(port, req)
    assert b" 200 " in head.split(b"\r\n")[0], head
    assert json.loads(body)["object"] == "chat.completion"
    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert lengths and int(lengths[0].split(b":")[1]) == len(body)

    # A stream to an HTTP/1.0 client: no chunked encoding, the body ends when the server closes.
    payload = json.dumps(chat_body(max_tokens=3, stream=True)).encode()
    req = (b"POST /v1/chat/completions HTTP/1.0\r\nConnection: close\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    head, body, _ = _raw_http(port, req)
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"chunked" not in head.lower()
    assert body.rstrip().endswith(b"data: [DONE]")

    # HTTP/1.1 with Connection: close also closes after one response.
    head, body, _ = _raw_http(port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"connection: close" in head.lower()
    assert json.loads(body)["object"] == "list"

    # An error over HTTP/1.0 is JSON too.
    head, body, _ = _raw_http(port, b"GET /v1/activations/cap_nope HTTP/1.0\r\nConnection: close\r\n\r\n")
    assert b" 404 " in head.split(b"\r\n")[0] and json.loads(body)["error"]["code"] == "not_found"


def test_no_cors_headers_by_default(base):
    r = requests.get(base + "/health", headers={"Origin": "http://evil.example"}, timeout=10)
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = requests.options(base + CHAT, headers=preflight,
                         timeout=10)
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def test_default_bind_is_loopback():
    out = subprocess.run([sys.executable, "-m", "control.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={k: v for k, v in __import__("os").environ.items()
                                                      if k != "NSBRIDGE_HOST"})
    assert out.returncode == 0, out.stderr
    assert "default 127.0.0.1" in " ".join(out.stdout.split())


# --- OpenAPI --------------------------------------------------------------------------------
def _app_operations(tmp_path) -> set[tuple[str, str]]:
    from starlette.routing import Route

    from control.app import AppConfig, create_app
    from control.service import ModelService, ServiceConfig
    from shm import ShmRegistry

    registry = ShmRegistry(state_dir=tmp_path, cleanup_at_exit=False)
    try:
        app = create_app(AppConfig(state_dir=str(tmp_path)), ModelService(ServiceConfig()), registry)
        ops = set()
        for route in app.routes:
            assert isinstance(route, Route), route
            if not route.include_in_schema:  # the viewer's page and files (GET /viz), not API operations
                continue
            path = re.sub(r"\{(\w+):\1\}", r"{\1}", route.path)  # the id convertors are ours
            ops |= {(path, m) for m in route.methods - {"HEAD"}}
        return ops
    finally:
        registry.close()


IDS = {"capture_id": "cap_0000000000000000", "vector_id": "vec_0000000000000000",
       "job_id": "harvest-0000000000000000"}  # a well-formed id of each kind that names nothing


def test_openapi_lists_exactly_the_routes(base, tmp_path):
    r = requests.get(base + "/openapi.json", timeout=10)
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    assert documented == _app_operations(tmp_path)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and {"200", "201", "202"} & set(op["responses"])
            for param in IDS:
                if "{" + param + "}" in path:
                    assert [p["name"] for p in op["parameters"]] == [param]
            # Every documented operation exists on the running server: never 404-for-route or 405.
            url = base + path
            for param, example in IDS.items():
                url = url.replace("{" + param + "}", example)
            if (path, method) == ("/v1/models/load", "post"):
                resp = requests.post(url, json={}, timeout=30)  # 400, not a load
            elif method == "post" and "requestBody" in op:
                resp = requests.post(url, data=b"[]", headers=JSON, timeout=30)  # 400 malformed, nothing runs
            elif method in ("delete", "post") and "hooks" in path:
                continue  # would clear registered hooks of other tests; exercised above
            else:
                resp = requests.request(method.upper(), url, timeout=30)
            assert resp.status_code != 405, (path, method)
            if resp.status_code == 404:
                assert any(kind in resp.json()["error"]["message"] for kind in ("capture", "vector", "harvest")), \
                    (path, method)
    # The documented request schemas agree with the server's limits.
    def body_schema(path):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]

    chat = body_schema(CHAT)
    assert chat["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 1
    act = body_schema(ACT)
    assert act["properties"]["activations_transport"]["enum"] == ["inline", "shm"]
    hook = spec["components"]["schemas"]["HookSpec"]
    components = hook["properties"]["component"]["anyOf"][0]["enum"]
    from vocabulary import COMPONENT_NAMES as COMPONENTS

    assert tuple(components) == COMPONENTS


def test_openapi_validates(base, tmp_path):
    spec = requests.get(base + "/openapi.json", timeout=10).json()
    try:
        from openapi_spec_validator import validate
    except ImportError:
        # Not in the project's venv; use another interpreter that has it, if any.
        import shutil

        for python in ("python3", "python"):
            exe = shutil.which(python)
            if exe and exe != sys.executable and subprocess.run(
                    [exe, "-c", "import openapi_spec_validator"], capture_output=True).returncode == 0:
                path = tmp_path / "openapi.json"
                path.write_text(json.dumps(spec))
                out = subprocess.run([exe, "-c", "import json, sys; from openapi_spec_validator import validate; "
                                      "validate(json.load(open(sys.argv[1]))); print('ok')", str(path)],
                                     capture_output=True, text=True, timeout=120)
                assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
                return
        pytest.skip("openapi-spec-validator is not installed")
    validate(spec)
