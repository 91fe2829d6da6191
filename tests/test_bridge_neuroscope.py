"""Hook specs, conversion into NeuroScope's format, and file export (tiny model, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bridge import (
    LMStudioNeuroScopeClient,
    NeuroScopeActivationBridge,
    entry_array,
    from_jsonable,
    load_any,
    load_capture,
    load_neuroscope,
    save_capture,
    to_jsonable,
    to_neuroscope,
)
from bridge.neuroscope import FORMAT, attention_summary, iter_tensors

MSGS = [{"role": "user", "content": "John gave Mary the book because she asked for it"}]
GREEDY = dict(max_tokens=4, temperature=0.0)
ALL_COMPONENTS = ["embedding", "residual", "attention", "mlp", "layernorm", "query", "key", "value",
                  "attention_scores", "attention_pattern"]
ALL_HOOKS = NeuroScopeActivationBridge.create_hook_specs_for_circuit_analysis(3, ALL_COMPONENTS)


@pytest.fixture(scope="module")
def client(tiny_server):
    c = LMStudioNeuroScopeClient(tiny_server.base_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def inline(client):
    return client.generate_with_activations(MSGS, ALL_HOOKS, **GREEDY)


def assert_same(a: dict, b: dict) -> None:
    """Two NeuroScope dicts hold the same tensors, bit for bit, with the same labels."""
    assert a["tokens"] == b["tokens"]
    assert {k: set(v) for k, v in a["layers"].items()} == {k: set(v) for k, v in b["layers"].items()}
    for layer, comp, t in iter_tensors(a):
        u = b["layers"][layer][comp]
        assert t["shape"] == u["shape"] and t["positions"] == u["positions"], (layer, comp)
        assert t["data"].dtype == u["data"].dtype == np.float32
        assert np.array_equal(t["data"], u["data"]), (layer, comp)
        # equal bits, not just equal values (-0.0 vs 0.0, NaN payloads)
        assert t["data"].tobytes() == u["data"].tobytes(), (layer, comp)


# --- hook specs ---------------------------------------------------------------------------
def test_circuit_analysis_hooks():
    b = NeuroScopeActivationBridge()
    hooks = b.create_hook_specs_for_circuit_analysis(2, ["residual", "mlp"])
    assert hooks == [
        {"layer_name": "transformer.h.0", "component": "residual", "hook_id": "transformer.h.0.residual",
         "capture_input": False, "capture_output": True},
        {"layer_name": "transformer.h.0", "component": "mlp", "hook_id": "transformer.h.0.mlp",
         "capture_input": False, "capture_output": True},
        {"layer_name": "transformer.h.1", "component": "residual", "hook_id": "transformer.h.1.residual",
         "capture_input": False, "capture_output": True},
        {"layer_name": "transformer.h.1", "component": "mlp", "hook_id": "transformer.h.1.mlp",
         "capture_input": False, "capture_output": True},
    ]
    assert [h["layer_name"] for h in b.create_hook_specs_for_circuit_analysis([5, 7], ["attention"])] == \
        ["transformer.h.5", "transformer.h.7"]
    with_embed = b.create_hook_specs_for_circuit_analysis(2, ["embedding", "residual"])
    assert [h["layer_name"] for h in with_embed] == ["transformer.wte", "transformer.h.0", "transformer.h.1"]
    assert b.create_hook_specs_for_circuit_analysis(1, "mlp")[0]["component"] == "mlp"
    assert all(h["capture_input"] for h in b.create_hook_specs_for_circuit_analysis(1, ["residual"], True))
    with pytest.raises(ValueError, match="unknown components"):
        b.create_hook_specs_for_circuit_analysis(2, ["residual", "neurons"])


def test_attention_analysis_hooks():
    b = NeuroScopeActivationBridge()
    hooks = b.create_attention_analysis_hooks(30, [14, -1])
    assert [(h["layer_name"], h["component"]) for h in hooks] == [
        ("transformer.h.14", "attention_pattern"), ("transformer.h.14", "attention"),
        ("transformer.h.29", "attention_pattern"), ("transformer.h.29", "attention"),
    ]
    assert len(b.create_attention_analysis_hooks(3)) == 6
    assert {h["component"] for h in b.create_attention_analysis_hooks(2, [1], include_scores=True)} == \
        {"attention_pattern", "attention", "attention_scores"}
    with pytest.raises(ValueError):
        b.create_attention_analysis_hooks(12, [12])
    with pytest.raises(ValueError):
        b.create_attention_analysis_hooks([0, 1], [3])


# --- the format ---------------------------------------------------------------------------
def test_format_layout(inline):
    ns = to_neuroscope(inline)
    n = len(inline["tokens"])
    assert ns["format"] == FORMAT and ns["model_id"] == "tiny-llama"
    assert ns["tokens"] == inline["tokens"] and ns["token_ids"] == inline["token_ids"]
    assert ns["prompt_tokens"] == inline["usage"]["prompt_tokens"]
    assert set(ns["layers"]) == {"transformer.wte", "transformer.h.0", "transformer.h.1", "transformer.h.2"}
    assert set(ns["layers"]["transformer.wte"]) == {"embedding"}
    layer = ns["layers"]["transformer.h.1"]
    assert set(layer) == set(ALL_COMPONENTS) - {"embedding"}
    expect = {"residual": [1, n, 64], "attention": [1, n, 64], "mlp": [1, n, 64], "layernorm": [1, n, 64],
              "query": [1, n, 4, 16], "key": [1, n, 2, 16], "value": [1, n, 2, 16],
              "attention_scores": [4, n, n], "attention_pattern": [4, n, n]}
    for comp, shape in expect.items():
        t = layer[comp]
        assert t["shape"] == shape and list(t["data"].shape) == shape, comp
        assert t["data"].dtype == np.float32 and t["data"].flags.c_contiguous and t["dtype"] == "float32"
        assert t["positions"] == list(range(n)) and t["tokens"] == inline["tokens"]
        assert t["layer"] == 1 and t["component"] == comp and t["is_input"] is False
        assert len(t["dims"]) == len(shape)
    assert layer["attention_pattern"]["key_tokens"] == inline["tokens"]

    pat = layer["attention_pattern"]["data"]
    scores = layer["attention_scores"]["data"]
    upper = np.triu(np.ones((n, n), bool), 1)
    assert np.allclose(pat.sum(-1), 1.0, atol=1e-5)
    assert (pat[:, upper] == 0).all() and (pat[:, ~upper] > 0).all()  # causal, prompt and decode rows alike
    assert np.isneginf(scores[:, upper]).all() and np.isfinite(scores[:, ~upper]).all()


def test_conversion_equals_raw_entries(inline):
    """Every tensor is the server's per-step entries, rearranged only."""
    ns = to_neuroscope(inline)
    for hook_id, entries in inline["activations"].items():
        e0 = entries[0]
        layer = "transformer.wte" if e0["component"] == "embedding" else f"transformer.h.{hook_id.split('.')[2]}"
        t = ns["layers"][layer][e0["component"]]
        for e in entries:
            raw = entry_array(e)
            lo, hi = e["positions"]
            if e["component"] in ("attention_scores", "attention_pattern"):
                got = t["data"][:, lo:hi, : raw.shape[-1]]
                rest = t["data"][:, lo:hi, raw.shape[-1]:]
                assert (np.isneginf(rest) if e["component"] == "attention_scores" else rest == 0).all()
            elif e["component"] in ("query", "key", "value"):
                got = np.moveaxis(t["data"][0, lo:hi], 0, 1)  # [T, H, d] -> the entry's [H, T, d]
            else:
                got = t["data"][0, lo:hi]
            assert got.tobytes() == raw.tobytes(), (hook_id, e["step"])


def test_lossless_across_transports(client, inline):
    """inline JSON, inline base64, streamed, shared memory and HTTP-fetched Arrow: identical."""
    ns = to_neuroscope(inline)
    assert_same(ns, to_neuroscope(client.generate_with_activations(MSGS, ALL_HOOKS, encoding="base64", **GREEDY)))
    assert_same(ns, to_neuroscope(client.generate_with_activations(MSGS, ALL_HOOKS, stream=True, **GREEDY).result()))
    with client.generate_with_activations(MSGS, ALL_HOOKS, transport="shm", **GREEDY) as cap:
        ns_shm = to_neuroscope(cap)
        view = client.fetch_capture(cap.capture_id)
        ns_http = to_neuroscope(view)
        view.close()
    assert ns_shm["capture_id"] == cap.capture_id and ns_shm["token_ids"] == inline["token_ids"]
    assert_same(ns, ns_shm)
    assert_same(ns, ns_http)
    # the converted arrays own their memory: still valid after the segment was released
    data = ns_shm["layers"]["transformer.h.0"]["residual"]["data"]
    assert data.flags.writeable and (data.base is None or data.base.flags.owndata)


@pytest.mark.parametrize("positions", ["last", "prompt", "generated"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_positions_and_dtypes(client, positions, dtype):
    hooks = NeuroScopeActivationBridge.create_hook_specs_for_circuit_analysis(
        [0, 2], ["residual", "value", "attention_scores", "attention_pattern"])
    kw = dict(positions=positions, dtype=dtype, **GREEDY)
    ns = to_neuroscope(client.generate_with_activations(MSGS, hooks, **kw))
    with client.generate_with_activations(MSGS, hooks, transport="shm", **kw) as cap:
        assert_same(ns, to_neuroscope(cap))
    assert_same(ns, to_neuroscope(client.generate_with_activations(MSGS, hooks, encoding="base64", **kw)))
    t = ns["layers"]["transformer.h.2"]["attention_pattern"]
    n, p = len(ns["tokens"]), ns["prompt_tokens"]
    rows = {"last": [p - 1] + list(range(p, n)), "prompt": list(range(p)), "generated": list(range(p, n))}
    assert t["positions"] == rows[positions]
    assert t["shape"] == [4, len(rows[positions]), t["positions"][-1] + 1]
    assert t["source_dtype"] == dtype and t["dtype"] == "float32"
    assert np.allclose(t["data"].sum(-1), 1.0, atol=2e-2)


def test_input_output_and_colliding_keys(client):
    hooks = [{"layer_name": "transformer.h.1", "component": "residual", "capture_input": True},
             "blocks.1.hook_resid_mid", "blocks.2.hook_resid_post", "hook_embed"]
    r = client.generate_with_activations(MSGS, hooks, **GREEDY)
    ns = to_neuroscope(r)
    l1 = ns["layers"]["transformer.h.1"]
    assert set(l1) == {"residual", "residual.input", "blocks.1.hook_resid_mid.input"}
    assert l1["residual.input"]["is_input"] and not l1["residual"]["is_input"]
    assert l1["blocks.1.hook_resid_mid.input"]["hook_id"] == "blocks.1.hook_resid_mid"
    assert set(ns["layers"]["transformer.h.2"]) == {"residual"}
    assert set(ns["layers"]["transformer.wte"]) == {"embedding"}
    with client.generate_with_activations(MSGS, hooks, transport="shm", **GREEDY) as cap:
        assert_same(ns, to_neuroscope(cap))


def test_jsonable_round_trip(inline):
    ns = to_neuroscope(inline)
    obj = to_jsonable(ns)
    text = json.dumps(obj)  # plain JSON, no numpy left
    assert "-Infinity" not in text and "NaN" not in text
    t = obj["layers"]["transformer.h.0"]["attention_scores"]
    assert t["encoding"] == "base64" and t["dtype"] == "float32"
    assert_same(ns, from_jsonable(json.loads(text)))
    lists = to_jsonable(ns, "list")
    text = json.dumps(lists, allow_nan=False)
    back = from_jsonable(json.loads(text))
    assert_same(ns, back)


def test_attention_summary(inline):
    ns = to_neuroscope(inline)
    q = inline["tokens"].index("he")  # "she" is " s" + "he" in the tiny tokenizer
    rows = attention_summary(ns, q)
    assert len(rows) == 3 * 4
    assert all(1 <= r["key_position"] < q and 0 <= r["weight"] <= 1 for r in rows)


# --- export -------------------------------------------------------------------------------
def test_export_arrow_round_trip(client, inline, tmp_path):
    ns = to_neuroscope(inline)
    path = save_capture(inline, tmp_path / "inline.arrow")
    view = load_capture(path)
    try:
        assert view.tokens == inline["tokens"] and view.token_ids == inline["token_ids"]
        assert view.model_id == "tiny-llama" and view.prompt_tokens == ns["prompt_tokens"]
        assert len(view.position) == len(inline["tokens"])
        assert_same(ns, to_neuroscope(view))
        resid = view["transformer.h.1.residual"].data
        assert np.array_equal(resid, np.concatenate(inline.arrays("transformer.h.1.residual")))
    finally:
        view.close()
    assert_same(ns, load_any(path))
    with client.generate_with_activations(MSGS, ALL_HOOKS, transport="shm", **GREEDY) as cap:
        path2 = cap.export(tmp_path / "shm.arrow")
    assert_same(ns, load_any(path2))  # readable after the capture was released
    stream = client.generate_with_activations(MSGS, ALL_HOOKS, stream=True, **GREEDY).result()
    assert_same(ns, load_any(save_capture(stream, tmp_path / "stream.arrow")))


def test_export_input_and_output_columns(client, tmp_path):
    hooks = [{"layer_name": "transformer.h.1", "component": "residual", "capture_input": True}]
    r = client.generate_with_activations(MSGS, hooks, **GREEDY)
    view = load_capture(save_capture(r, tmp_path / "io.arrow"))
    try:
        assert {(h.info.hook_id, h.info.is_input) for h in view.hooks.values()} == \
            {("transformer.h.1.residual", True), ("transformer.h.1.residual", False)}
        assert_same(to_neuroscope(r), to_neuroscope(view))
    finally:
        view.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_keeps_half_dtypes(client, tmp_path, dtype):
    hooks = [{"layer_name": "transformer.h.0", "component": "mlp"}]
    r = client.generate_with_activations(MSGS, hooks, dtype=dtype, **GREEDY)
    view = load_capture(save_capture(r, tmp_path / "half.arrow"))
    try:
        assert view["transformer.h.0.mlp"].dtype == dtype
        assert_same(to_neuroscope(r), to_neuroscope(view))
    finally:
        view.close()


def test_export_safetensors_round_trip(inline, tmp_path):
    pytest.importorskip("safetensors")
    ns = to_neuroscope(inline)
    path = save_capture(inline, tmp_path / "run.safetensors")
    back = load_neuroscope(path)
    assert_same(ns, back)
    assert back["format"] == FORMAT and back["model_id"] == ns["model_id"]
    t, u = ns["layers"]["transformer.h.2"]["attention_pattern"], back["layers"]["transformer.h.2"]["attention_pattern"]
    assert {k: v for k, v in t.items() if k != "data"} == {k: v for k, v in u.items() if k != "data"}
    assert_same(ns, load_any(save_capture(ns, tmp_path / "ns.safetensors")))  # the dict itself too


def test_convert_errors(client):
    with pytest.raises(ValueError, match="no 'activations'"):
        to_neuroscope(client.chat(MSGS, **GREEDY))
    cap = client.generate_with_activations(MSGS, ALL_HOOKS[:2], transport="shm", **GREEDY)
    with pytest.raises(ValueError, match="shared-memory entry"):
        to_neuroscope(dict(cap.response))  # the entries carry handles, not data
    cap.close()
    with pytest.raises(ValueError, match="closed"):
        to_neuroscope(cap)
    with pytest.raises(TypeError):
        to_neuroscope(42)
