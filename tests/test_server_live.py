"""The server with the real default model (SmolLM2-135M, float32): slow, marked so."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from shm import open_capture
from tests.test_server import assert_same, entry_array, inline_by_step, shm_step

pytestmark = pytest.mark.slow
ACT = "/v1/chat/completions/with_activations"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(live_server):
    # (No reload here: other live tests in the session rely on the id the server started with.)
    card = requests.get(live_server.base_url + "/v1/models", timeout=10).json()["data"][0]
    assert card["supports_activations"] is True
    assert (card["n_layers"], card["d_model"], card["n_heads"], card["n_kv_heads"]) == (30, 576, 9, 3)


def test_openai_package_answers_paris(live_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in resp.choices[0].message.content
    chunks = list(client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_neuroscope_request_inline_equals_shm(live_server):
    base = live_server.base_url
    hooks = [
        {"layer_name": "transformer.h.5", "component": "residual", "hook_id": "resid_5",
         "capture_input": False, "capture_output": True},
        {"layer_name": "transformer.wte", "component": "embedding", "hook_id": "emb"},
        {"layer_name": "blocks.3.attn.hook_pattern", "hook_id": "pat_3"},
        {"layer_name": "model.layers.7", "component": "key", "hook_id": "k_7"},
    ]
    body = {"messages": QUESTION, "max_tokens": 4, "temperature": 0.0, "activation_hooks": hooks}
    inline = requests.post(base + ACT, json=body, timeout=300).json()
    shm = requests.post(base + ACT, json={**body, "activations_transport": "shm"}, timeout=300).json()
    assert shm["token_ids"] == inline["token_ids"]
    prompt = inline["usage"]["prompt_tokens"]
    first = {h: entries[0] for h, entries in inline["activations"].items()}
    assert first["resid_5"]["shape"] == [prompt, 576] and first["resid_5"]["dtype"] == "float32"
    assert first["pat_3"]["shape"] == [9, prompt, prompt]
    assert first["k_7"]["shape"] == [3, prompt, 64]
    np.testing.assert_allclose(entry_array(first["pat_3"]).sum(-1), 1.0, rtol=1e-4)
    components = {h: e["component"] for h, e in first.items()}
    try:
        with open_capture(shm["capture"]["handle"]) as view:
            for (hook_id, _, step), a in inline_by_step(inline["activations"]).items():
                assert_same(shm_step(view, hook_id, step, components[hook_id]), a, f"{hook_id} step {step}")
    finally:
        requests.delete(f"{base}/v1/activations/{shm['capture']['capture_id']}", timeout=10)
