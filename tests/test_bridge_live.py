"""The client and the conversion against the real default model (SmolLM2-135M): slow."""

from __future__ import annotations

import numpy as np
import pytest

from bridge import LMStudioNeuroScopeClient, NeuroScopeActivationBridge, to_neuroscope
from bridge.neuroscope import iter_tensors

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server):
    c = LMStudioNeuroScopeClient(live_server.base_url)
    yield c
    c.close()


def assert_same(a: dict, b: dict) -> None:
    assert a["tokens"] == b["tokens"]
    for layer, comp, t in iter_tensors(a):
        u = b["layers"][layer][comp]
        assert t["shape"] == u["shape"] and t["positions"] == u["positions"]
        assert t["data"].tobytes() == u["data"].tobytes(), (layer, comp)


def test_real_model_answers_and_streams(client):
    assert client.list_models()[0]["n_layers"] == 30
    full = client.chat(QUESTION, max_tokens=16, temperature=0.0)
    assert "Paris" in full.text
    stream = client.chat(QUESTION, max_tokens=16, temperature=0.0, stream=True)
    assert "".join(stream) == full.text


def test_real_model_capture_all_transports_agree(client):
    b = NeuroScopeActivationBridge(client)
    hooks = b.create_hook_specs_for_circuit_analysis([0, 15, 29], ["residual", "attention", "mlp", "query"])
    hooks += b.create_attention_analysis_hooks(30, [3, 29], include_scores=True)
    hooks = list({h["hook_id"]: h for h in hooks}.values())
    kw = dict(max_tokens=8, temperature=0.0)
    inline = client.generate_with_activations(QUESTION, hooks, **kw)
    assert "Paris" in inline.text
    ns = to_neuroscope(inline)
    n = len(inline["tokens"])
    assert ns["layers"]["transformer.h.15"]["residual"]["shape"] == [1, n, 576]
    assert ns["layers"]["transformer.h.15"]["query"]["shape"] == [1, n, 9, 64]
    pat = ns["layers"]["transformer.h.29"]["attention_pattern"]
    assert pat["shape"] == [9, n, n] and np.allclose(pat["data"].sum(-1), 1.0, atol=1e-4)

    stream = client.generate_with_activations(QUESTION, hooks, stream=True, **kw)
    events = list(stream)
    assert "".join(e.text for e in events) == inline.text
    assert sum(1 for e in events if e.activations) >= 3  # per step, as they arrive
    assert stream.activations == inline["activations"]
    assert_same(ns, to_neuroscope(stream.result()))

    with client.generate_with_activations(QUESTION, hooks, transport="shm", **kw) as cap:
        assert cap.zero_copy and cap.text == inline.text
        assert_same(ns, to_neuroscope(cap))
    assert cap.capture_id not in {s["capture_id"] for s in client.list_captures()["segments"]}
    assert_same(ns, to_neuroscope(client.generate_with_activations(QUESTION, hooks, encoding="base64", **kw)))
