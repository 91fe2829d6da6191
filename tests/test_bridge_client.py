"""The Python client against a real server with a tiny random llama (fast)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bridge import (
    ActivationResult,
    ActivationStream,
    LMStudioNeuroScopeClient,
    NeuroScopeActivationBridge,
    NeuroScopeConnectionError,
    NeuroScopeServerError,
    ShmCapture,
    entry_array,
)
from bridge.client import _iter_sse
from tests.conftest import ServerProcess, free_port

MSGS = [{"role": "user", "content": "John gave Mary the book"}]
GREEDY = dict(max_tokens=5, temperature=0.0)
HOOKS = [
    {"layer_name": "transformer.h.1", "component": "residual"},
    {"layer_name": "transformer.h.0", "component": "attention_pattern"},
    {"layer_name": "transformer.h.2", "component": "key"},
]


@pytest.fixture(scope="module")
def client(tiny_server):
    c = LMStudioNeuroScopeClient(tiny_server.base_url)
    yield c
    c.close()


@pytest.fixture()
def no_registered_hooks(client):
    client.clear_hooks()
    yield
    client.clear_hooks()


def _concat(result, hook_id, is_input=False):
    """A hook's inline per-step arrays, token-major and concatenated (keys padded)."""
    arrays = result.arrays(hook_id, is_input)
    comp = result["activations"][hook_id][0]["component"]
    if comp in ("query", "key", "value", "attention_scores", "attention_pattern"):
        arrays = [np.moveaxis(a, 1, 0) for a in arrays]
    if comp in ("attention_scores", "attention_pattern"):
        n = max(a.shape[-1] for a in arrays)
        pad = -np.inf if comp == "attention_scores" else 0.0
        arrays = [np.concatenate([a, np.full(a.shape[:-1] + (n - a.shape[-1],), pad, np.float32)], -1)
                  for a in arrays]
    return np.concatenate(arrays, 0)


# --- basics -------------------------------------------------------------------------------
def test_base_url_attribute_and_defaults():
    c = LMStudioNeuroScopeClient()
    assert c.base_url == "http://127.0.0.1:8080"
    assert LMStudioNeuroScopeClient("http://h:1/").base_url == "http://h:1"


def test_health_and_models(client):
    h = client.health()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["model_id"] == "tiny-llama"
    models = client.list_models()
    assert [m["id"] for m in models] == ["tiny-llama"]
    assert models[0]["supports_activations"] is True and models[0]["n_layers"] == 3


def test_load_model(client, tiny_server, no_registered_hooks):
    out = client.load_model(tiny_server.model_path, model_id="tiny-llama")
    assert out["status"] == "loaded" and out["model_id"] == "tiny-llama" and out["supports_activations"] is True
    assert client.health()["model_id"] == "tiny-llama"


def test_load_model_forbidden_path_is_typed_error(client):
    with pytest.raises(NeuroScopeServerError) as ei:
        client.load_model("/opt/not-an-allowed-dir/model")
    e = ei.value
    assert e.status == 403 and e.code == "model_path_forbidden" and e.param == "model_path"
    assert "not allowed" in e.message and e.type == "permission_error"
    assert client.health()["model_id"] == "tiny-llama"  # the old model stays


def test_chat(client):
    r = client.chat(MSGS, **GREEDY)
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r.text == r["choices"][0]["message"]["content"] and r.finish_reason in ("length", "stop")
    assert r["usage"]["completion_tokens"] <= 5


def test_chat_stream_deltas_concatenate_to_text(client):
    full = client.chat(MSGS, max_tokens=8, temperature=0.0)
    stream = client.chat(MSGS, max_tokens=8, temperature=0.0, stream=True)
    deltas = list(stream)
    assert all(isinstance(d, str) for d in deltas) and len(deltas) >= 2
    assert "".join(deltas) == full.text == stream.text
    assert stream.finish_reason == full.finish_reason


def test_hook_points(client):
    hp = client.hook_points()
    assert hp["model_id"] == "tiny-llama" and hp["n_layers"] == 3
    names = {p["name"] for p in hp["points"]}
    assert {"hook_embed", "blocks.0.hook_resid_post", "blocks.2.attn.hook_pattern"} <= names
    resid = next(p for p in hp["points"] if p["name"] == "blocks.1.hook_resid_post")
    assert "transformer.h.1" in resid["aliases"] and resid["shape_per_token"] == [64]


def test_register_list_clear_hooks(client, no_registered_hooks):
    hooks = [{"layer_name": "transformer.h.1", "component": "mlp", "hook_id": "m1"}]
    out = client.register_hooks(hooks)
    assert out["status"] == "registered" and out["count"] == 1
    assert client.list_hooks() == hooks
    r = client.generate_with_activations(MSGS, None, **GREEDY)  # no hooks named: the registered ones
    assert list(r["activations"]) == ["m1"] and r["activations"]["m1"][0]["component"] == "mlp"
    assert client.clear_hooks()["cleared"] == 1
    assert client.list_hooks() == []
    with pytest.raises(NeuroScopeServerError) as ei:
        client.generate_with_activations(MSGS, None, **GREEDY)
    assert ei.value.status == 400 and ei.value.param == "activation_hooks" and "no activation hooks" in ei.value.message


# --- inline -------------------------------------------------------------------------------
def test_generate_inline_is_the_response_dict(client):
    r = client.generate_with_activations(MSGS, HOOKS, **GREEDY)
    assert isinstance(r, ActivationResult) and isinstance(r, dict)
    assert r["choices"][0]["message"]["content"] == r.text
    assert set(r["activations"]) == {"transformer.h.1.residual", "transformer.h.0.attention_pattern",
                                     "transformer.h.2.key"}
    n = len(r["tokens"])
    assert n == len(r["token_ids"]) == r["usage"]["total_tokens"]
    resid = r["activations"]["transformer.h.1.residual"]
    assert [e["step"] for e in resid] == list(range(len(resid)))
    for e in resid:
        a = entry_array(e)
        assert a.dtype == np.float32 and list(a.shape) == e["shape"]
        assert e["positions"][1] - e["positions"][0] == a.shape[0]
    assert sum(e["shape"][0] for e in resid) == n
    # the same greedy request gives the same text and values as plain chat
    assert r.text == client.chat(MSGS, **GREEDY).text


def test_base64_encoding_equals_json(client):
    j = client.generate_with_activations(MSGS, HOOKS, **GREEDY)
    b = client.generate_with_activations(MSGS, HOOKS, encoding="base64", **GREEDY)
    for hook_id in j["activations"]:
        assert "data_base64" in b["activations"][hook_id][0]
        for x, y in zip(j.arrays(hook_id), b.arrays(hook_id)):
            assert np.array_equal(x, y)


def test_tl_names_as_strings(client):
    r = client.generate_with_activations(MSGS, ["blocks.1.hook_resid_pre", "hook_embed"], **GREEDY)
    assert set(r["activations"]) == {"blocks.1.hook_resid_pre", "hook_embed"}
    assert r["activations"]["blocks.1.hook_resid_pre"][0]["is_input"] is True


def test_bridge_hook_specs_resolve_on_the_server(client):
    b = NeuroScopeActivationBridge(client)
    hooks = b.create_hook_specs_for_circuit_analysis(3, ["embedding", "residual", "attention", "mlp"])
    hooks += [h for h in b.create_attention_analysis_hooks(3, [0, 2]) if h["component"] == "attention_pattern"]
    r = client.generate_with_activations(MSGS, hooks, **GREEDY)
    assert set(r["activations"]) == {h["hook_id"] for h in hooks} and len(hooks) == 1 + 3 * 3 + 2


# --- streaming ----------------------------------------------------------------------------
def test_stream_with_activations(client):
    full = client.generate_with_activations(MSGS, HOOKS, max_tokens=6, temperature=0.0)
    stream = client.generate_with_activations(MSGS, HOOKS, max_tokens=6, temperature=0.0, stream=True)
    assert isinstance(stream, ActivationStream)
    events = list(stream)
    texts = "".join(e.text for e in events)
    assert texts == full.text == stream.text
    # activations arrive step by step, not all at the end
    steps = [e.steps for e in events if e.activations]
    assert len(steps) >= 3 and steps[0] == [0]
    assert [s for ss in steps for s in ss] == list(range(len(full["activations"]["transformer.h.1.residual"])))
    assert events[-1].finish_reason == full.finish_reason and events[-1].tokens == full["tokens"]
    # concatenated per-step entries equal the non-streamed answer, entry for entry
    assert stream.activations == full["activations"]
    result = stream.result()
    assert isinstance(result, ActivationResult) and result.text == full.text
    assert result["usage"] == full["usage"]
    for hook_id in full["activations"]:
        for x, y in zip(full.arrays(hook_id), result.arrays(hook_id)):
            assert np.array_equal(x, y)


def test_stream_result_without_iterating(client):
    full = client.generate_with_activations(MSGS, HOOKS, **GREEDY)
    res = client.generate_with_activations(MSGS, HOOKS, stream=True, **GREEDY).result()
    assert res.text == full.text and res["activations"] == full["activations"]


def test_stream_errors_before_streaming(client):
    with pytest.raises(NeuroScopeServerError) as ei:
        client.generate_with_activations(MSGS, [{"layer_name": "transformer.h.9", "component": "mlp"}],
                                         stream=True, **GREEDY)
    assert ei.value.status == 400 and ei.value.code == "unknown_hook" and "3 layers" in ei.value.message


def test_stream_shm(client):
    full = client.generate_with_activations(MSGS, HOOKS, **GREEDY)
    stream = client.generate_with_activations(MSGS, HOOKS, stream=True, transport="shm", **GREEDY)
    events = list(stream)
    assert "".join(e.text for e in events) == full.text
    assert all(not e.activations for e in events)
    last = events[-1]
    assert isinstance(last.capture, ShmCapture) and last.capture is stream.capture
    with stream.result() as cap:
        assert cap.text == full.text and cap.tokens == full["tokens"]
        for hook_id in full["activations"]:
            assert np.array_equal(cap.arrays[hook_id], _concat(full, hook_id))
    assert cap.capture_id not in {s["capture_id"] for s in client.list_captures()["segments"]}


class _FakeResponse:
    def __init__(self, pieces):
        self.pieces = pieces

    def iter_content(self, chunk_size=None):
        yield from self.pieces

    def close(self):
        pass


def test_sse_parser_split_chunks_and_error_event():
    body = (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
            b': a comment\n\ndata: {"choices": [{"delta": {"content": "b"}}]}\r\n\r\n'
            b'data: {"error": {"message": "boom", "type": "server_error", "param": null, "code": "x"}}\n\n'
            b"data: [DONE]\n\n")
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    it = _iter_sse(_FakeResponse(pieces))
    assert next(it)["choices"][0]["delta"]["content"] == "a"
    assert next(it)["choices"][0]["delta"]["content"] == "b"
    with pytest.raises(NeuroScopeServerError) as ei:
        next(it)
    assert ei.value.status is None and ei.value.message == "boom" and ei.value.code == "x"


# --- shared memory --------------------------------------------------------------------------
def test_shm_zero_copy_and_equal_to_inline(client):
    inline = client.generate_with_activations(MSGS, HOOKS, **GREEDY)
    with client.generate_with_activations(MSGS, HOOKS, transport="shm", **GREEDY) as cap:
        assert isinstance(cap, ShmCapture) and cap.zero_copy
        assert cap["choices"][0]["message"]["content"] == inline.text  # response keys still work
        assert cap.tokens == inline["tokens"] and cap.token_ids == inline["token_ids"]
        seg = cap.view.segment
        lo, hi = seg.address(), seg.address() + seg.size
        for hook_id, arr in cap.arrays.items():
            assert lo <= arr.ctypes.data and arr.ctypes.data + arr.nbytes <= hi  # inside the mapping
            assert not arr.flags.writeable
            assert np.array_equal(arr, _concat(inline, hook_id))
        # per step, as the server computed them
        pat = cap.hook("transformer.h.0.attention_pattern")
        for e in inline["activations"]["transformer.h.0.attention_pattern"]:
            assert np.array_equal(np.moveaxis(pat.for_step(e["step"]), 0, 1), entry_array(e))
        assert cap.capture_id in {s["capture_id"] for s in client.list_captures()["segments"]}


def test_shm_release_on_close(client):
    cap = client.generate_with_activations(MSGS, HOOKS, transport="shm", **GREEDY)
    name, capture_id = cap.handle["name"], cap.capture_id
    assert os.path.exists(f"/dev/shm/{name}")
    cap.close()
    assert cap.closed and cap.view is None
    with pytest.raises(ValueError):
        cap.arrays
    status = client.list_captures()
    assert capture_id not in {s["capture_id"] for s in status["segments"]}
    assert name not in {s["name"] for s in status["segments"]}
    with pytest.raises(NeuroScopeServerError) as ei:
        client.fetch_capture(capture_id)
    assert ei.value.status == 404
    # The server keeps released segments pre-faulted for reuse: the name stays in /dev/shm
    # only as a pooled (not live) segment.
    assert not os.path.exists(f"/dev/shm/{name}") or status["pooled_segments"] >= 1
    cap.close()  # idempotent


def test_release_explicitly_and_twice(client):
    cap = client.generate_with_activations(MSGS, HOOKS, transport="shm", **GREEDY)
    out = client.release(cap)
    assert out == {"capture_id": cap.capture_id, "status": "released"} and cap.view is None
    with pytest.raises(NeuroScopeServerError) as ei:
        client.release(cap.capture_id)
    assert ei.value.status == 404 and ei.value.code == "not_found"
    cap.close()  # already released: no error


def test_fetch_capture_over_http(client):
    with client.generate_with_activations(MSGS, HOOKS, transport="shm", **GREEDY) as cap:
        view = client.fetch_capture(cap.capture_id)
        try:
            assert view.capture_id == cap.capture_id and view.tokens == cap.tokens
            for hook_id, arr in cap.arrays.items():
                assert np.array_equal(view[hook_id].data, arr)
        finally:
            view.close()


def test_shm_input_and_output_of_one_hook(client):
    hooks = [{"layer_name": "transformer.h.1", "component": "residual", "capture_input": True}]
    inline = client.generate_with_activations(MSGS, hooks, **GREEDY)
    hook_id = "transformer.h.1.residual"
    assert [e["is_input"] for e in inline["activations"][hook_id][:2]] == [True, False]
    with client.generate_with_activations(MSGS, hooks, transport="shm", **GREEDY) as cap:
        assert len(cap.view.hooks) == 2
        for is_input in (True, False):
            assert cap.hook(hook_id, is_input).info.is_input is is_input
            assert np.array_equal(cap.array(hook_id, is_input), _concat(inline, hook_id, is_input))
        assert not np.array_equal(cap.array(hook_id, True), cap.array(hook_id, False))


# --- errors -------------------------------------------------------------------------------
def test_errors_are_typed_with_the_server_message(client):
    with pytest.raises(NeuroScopeServerError) as ei:
        client.generate_with_activations(MSGS, [{"layer_name": "transformer.h.1", "component": "nonsense"}])
    assert ei.value.status == 400 and ei.value.code == "unknown_hook" and "unknown component" in ei.value.message
    with pytest.raises(NeuroScopeServerError) as ei:
        client.generate_with_activations(MSGS, HOOKS, encoding="utf7")
    assert ei.value.status == 400 and ei.value.param == "activations_encoding"
    with pytest.raises(NeuroScopeServerError) as ei:
        client.request("GET", "/v1/nowhere")
    assert ei.value.status == 404 and "no route" in ei.value.message
    with pytest.raises(NeuroScopeServerError) as ei:
        client.chat(MSGS, max_tokens=-3)
    assert ei.value.status in (400,) and ei.value.message
    with pytest.raises(ValueError):
        client.generate_with_activations(MSGS, HOOKS, transport="carrier-pigeon")


def test_connection_error():
    c = LMStudioNeuroScopeClient(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(NeuroScopeConnectionError):
        c.health()


def test_api_key(tiny_llama_path, tmp_path):
    server = ServerProcess(str(tiny_llama_path), tmp_path, extra=["--api-key", "sekret"])
    try:
        with pytest.raises(NeuroScopeServerError) as ei:
            LMStudioNeuroScopeClient(server.base_url).list_models()
        assert ei.value.status == 401 and ei.value.code == "invalid_api_key"
        c = LMStudioNeuroScopeClient(server.base_url, api_key="sekret")
        assert c.list_models()[0]["id"]
        r = c.generate_with_activations(MSGS, HOOKS[:1], **GREEDY)
        assert r["activations"]
        with c.generate_with_activations(MSGS, HOOKS[:1], transport="shm", **GREEDY) as cap:
            assert cap.arrays
        assert "".join(c.chat(MSGS, stream=True, **GREEDY))
    finally:
        server.stop()
