"""The viewer (GET /viz) in a real headless Chromium, against a real tiny-model server with an API key,
and the two endpoints it relies on (a capture cut to some columns, the logit lens) over plain HTTP.

Every number the page shows is checked against an independent source: attention values against the
capture's Arrow stream fetched here, the logit lens against final norm + unembedding computed in numpy
from the model's safetensors, token colours against numpy norms, steering against the chat API.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from shm.reader import read_capture_bytes
from tests.conftest import ServerProcess

KEY = "viz-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ACT = "/v1/chat/completions/with_activations"
PROMPT = "When John and Mary went to the store, John gave a drink to"
N_LAYERS, N_HEADS = 3, 4  # tests/tiny_models.py's llama
ROOT = Path(__file__).resolve().parent.parent


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return os.environ.get("NSBRIDGE_CHROMIUM") or None


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    srv = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("viz-server"), extra=["--api-key", KEY])
    yield srv
    srv.stop()


# --- the model's head in numpy, from its weights ---------------------------------------------------
@pytest.fixture(scope="module")
def head(tiny_llama_path):
    from safetensors.numpy import load_file

    weights = load_file(str(tiny_llama_path / "model.safetensors"))
    config = json.loads((tiny_llama_path / "config.json").read_text())
    assert config["tie_word_embeddings"]
    return weights["model.norm.weight"].astype(np.float64), weights["model.embed_tokens.weight"].astype(np.float64), \
        config["rms_norm_eps"]


def numpy_lens(head, residuals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of softmax(RMSNorm(residual) @ E^T), float64: [L, T, k] ids and probabilities."""
    norm_w, embed, eps = head
    x = residuals.astype(np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * norm_w
    logits = x @ embed.T
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return ids, np.take_along_axis(probs, ids, axis=-1)


def capture(server, hooks: list[dict], max_tokens: int = 3) -> dict:
    r = requests.post(server.base_url + ACT, headers=AUTH, timeout=60, json={
        "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "activation_hooks": hooks,
        "activations_transport": "shm"})
    assert r.status_code == 200, r.text
    return r.json()


def arrow(server, capture_id: str, query: str = ""):
    r = requests.get(f"{server.base_url}/v1/activations/{capture_id}{query}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.apache.arrow.stream"
    return read_capture_bytes(r.content)


def resid_hooks() -> list[dict]:
    return [{"layer_name": f"blocks.{n}.hook_resid_post", "hook_id": f"L{n}.resid"} for n in range(N_LAYERS)]


# --- HTTP: the endpoints behind the page ----------------------------------------------------------
def test_logit_lens_endpoint_matches_numpy(server, head):
    out = capture(server, resid_hooks())
    cid = out["capture"]["capture_id"]
    with arrow(server, cid) as cap:
        residuals = np.stack([cap[f"L{n}.resid"].data for n in range(N_LAYERS)])
        positions = cap.position.tolist()
    r = requests.post(f"{server.base_url}/v1/activations/{cid}/logit_lens", headers=AUTH, json={"top_k": 5},
                      timeout=60)
    assert r.status_code == 200, r.text
    lens = r.json()
    assert lens["layers"] == list(range(N_LAYERS)) and lens["positions"] == positions and lens["top_k"] == 5
    ids, probs = np.array(lens["token_ids"]), np.array(lens["probs"])
    assert ids.shape == probs.shape == (N_LAYERS, len(positions), 5)
    ref_ids, ref_probs = numpy_lens(head, residuals, 5)
    np.testing.assert_allclose(probs, ref_probs, rtol=2e-4, atol=1e-6)
    # Ids agree wherever the ranking is not a near tie.
    gaps = np.diff(ref_probs, axis=-1)
    clear = np.concatenate([np.abs(gaps) > 1e-5, np.ones_like(gaps[..., :1], dtype=bool)], axis=-1)
    assert (ids[clear] == ref_ids[clear]).all()
    assert set(lens["strings"]) == {str(i) for i in np.unique(ids)}
    # The last layer's lens is the model's own prediction: its top token is what greedy decoding chose.
    prompt_len = out["usage"]["prompt_tokens"]
    assert ids[-1, positions.index(prompt_len - 1), 0] == out["token_ids"][prompt_len]
    # The Python bridge asks the same.
    from bridge.client import LMStudioNeuroScopeClient

    with LMStudioNeuroScopeClient(server.base_url, api_key=KEY) as client:
        assert client.logit_lens(cid, top_k=5)["token_ids"] == lens["token_ids"]
    # Some layers, some positions.
    r = requests.post(f"{server.base_url}/v1/activations/{cid}/logit_lens", headers=AUTH,
                      json={"top_k": 2, "layers": [2, 0], "positions": [3, 1]}, timeout=60)
    sub = r.json()
    assert sub["layers"] == [2, 0] and sub["positions"] == [3, 1]
    np.testing.assert_array_equal(np.array(sub["token_ids"]), ids[[2, 0]][:, [3, 1], :2])


def test_engine_logit_lens_without_a_server(tiny_llama, head):
    """engine.Model.logit_lens on a real forward: numpy agrees, and the last layer is the model's own
    next-token distribution (its log-probabilities from generation)."""
    import engine

    model = engine.Model(tiny_llama)
    hooks = [{"layer_name": f"blocks.{n}.hook_resid_post"} for n in range(N_LAYERS)]
    out = model.generate(prompt=PROMPT, max_tokens=1, temperature=0, hooks=hooks, logprobs=True, top_logprobs=4)
    residuals = np.stack([np.asarray(out.activations[f"blocks.{n}.hook_resid_post"]) for n in range(N_LAYERS)])
    ids, probs = model.logit_lens(residuals, top_k=4)
    ref_ids, ref_probs = numpy_lens(head, residuals, 4)
    np.testing.assert_allclose(probs, ref_probs, rtol=2e-4, atol=1e-6)
    last = residuals.shape[1] - 2  # the last prompt position predicts the generated token
    assert [(int(i), pytest.approx(float(np.log(p)), abs=1e-4)) for i, p in zip(ids[-1, last], probs[-1, last])] \
        == [(t, lp) for t, lp in out.logprobs[0].top]
    one_ids, _ = model.logit_lens(residuals[1], top_k=4)  # [T, d_model]: one layer
    np.testing.assert_array_equal(one_ids[0], ids[1])
    with pytest.raises(engine.errors.InvalidArgument):
        model.logit_lens(residuals, top_k=0)
    with pytest.raises(engine.errors.InvalidArgument):
        model.logit_lens(residuals[..., :10])


LENS_ARCHS = ["gpt2", "cohere2", "gemma3_text", "granite", "gemma2"]  # tied heads, logit scale, softcaps


@pytest.mark.parametrize("model_type", [pytest.param(m, marks=() if m in ("gpt2", "cohere2", "gemma3_text")
                                                     else pytest.mark.slow) for m in LENS_ARCHS])
def test_lens_of_the_last_layer_is_the_models_own_output(model_type):
    """The last block's residual through the lens is the model's own logits (its __call__, softcaps and
    logit scales included), on tiny random models of architectures whose heads differ."""
    import mlx.core as mx

    import engine
    from engine.model import load_model
    from tests.test_arch_zoo import prompt_ids, zoo_model

    folder = zoo_model(model_type)
    model = engine.Model(load_model(str(folder), model_type))
    ids = prompt_ids(folder)
    last = model.info.n_layers - 1
    out = model.generate(prompt=ids, max_tokens=1, temperature=0,
                         hooks=[{"layer_name": f"blocks.{last}.hook_resid_post", "hook_id": "r"}])
    lens_ids, lens_probs = model.logit_lens(np.asarray(out.activations["r"])[None, : len(ids)], top_k=5)
    logits = np.array(model.lm.model(mx.array([ids]))[0].astype(mx.float32)).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.take_along_axis(probs, lens_ids[0].astype(np.int64), axis=-1)
    np.testing.assert_allclose(lens_probs[0], want, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(lens_probs[0], -np.sort(-probs, axis=-1)[:, :5], rtol=1e-3, atol=1e-6)


def test_logit_lens_endpoint_errors(server):
    cid = capture(server, resid_hooks()[:2])["capture"]["capture_id"]
    lens = f"{server.base_url}/v1/activations/{cid}/logit_lens"

    def error(body, status=400, url=lens):
        r = requests.post(url, headers=AUTH, json=body, timeout=30)
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert error({"top_k": 0})["param"] == "top_k"
    assert error({"top_k": 101})["param"] == "top_k"
    e = error({"layers": [2]})
    assert e["param"] == "layers" and "[0, 1]" in e["message"]
    assert error({"positions": [999]})["param"] == "positions"
    assert error({"unknown": 1})["code"] == "invalid_value"
    assert "capture" in error({}, 404, lens.replace(cid, "cap_0000000000000000"))["message"]
    pattern_only = capture(server, [{"layer_name": "blocks.0.attn.hook_pattern"}])["capture"]["capture_id"]
    assert "residual" in error({}, 400, lens.replace(cid, pattern_only))["message"]
    r = requests.post(lens, json={}, timeout=30)  # the key is required, as everywhere under /v1
    assert r.status_code == 401


def test_capture_column_filter(server):
    hooks = [{"layer_name": "blocks.1.attn.hook_pattern", "hook_id": "p1"}, *resid_hooks()[:1]]
    cid = capture(server, hooks)["capture"]["capture_id"]
    with arrow(server, cid) as full, arrow(server, cid, "?hooks=p1") as cut:
        assert list(cut.hooks) == ["p1"]
        np.testing.assert_array_equal(cut["p1"].data, full["p1"].data)
        np.testing.assert_array_equal(cut.position, full.position)
        assert cut.tokens == full.tokens and cut.capture_id == cid
        pattern = full["p1"].data.copy()
    with arrow(server, cid, "?hooks=p1,L0.resid&heads=3,1") as heads:
        assert heads["p1"].data.shape == (pattern.shape[0], 2, pattern.shape[2])
        assert heads["p1"].info.shape == (2, pattern.shape[2])
        np.testing.assert_array_equal(heads["p1"].data, pattern[:, [3, 1]])
        assert heads["L0.resid"].data.shape[1:] == (64,)  # not a per-head column: unchanged
    for query, param in (("?hooks=nope", "hooks"), ("?hooks=", "hooks"), ("?hooks=p1&heads=9", "heads"),
                         ("?heads=a", "heads"), ("?heads=1,1", "heads")):
        r = requests.get(f"{server.base_url}/v1/activations/{cid}{query}", headers=AUTH, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (query, r.text)


def test_page_is_public_data_is_not(server):
    base = server.base_url
    r = requests.get(base + "/viz", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "https://" not in r.text and "http://" not in r.text  # nothing from a CDN
    for name, media in (("viz.js", "text/javascript"), ("flechette.mjs", "text/javascript"), ("viz.css", "text/css")):
        r = requests.get(f"{base}/viz/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
    assert requests.get(base + "/viz/app.py", timeout=10).status_code == 404
    assert requests.get(base + "/viz/..%2Fapp.py", timeout=10).status_code == 404
    assert requests.get(base + "/v1/models", timeout=10).status_code == 401
    # The Host and Origin checks still apply to the page (DNS rebinding, foreign pages).
    assert requests.get(base + "/viz", headers={"Host": "evil.example"}, timeout=10).status_code == 400
    r = requests.get(base + "/viz", headers={"Origin": "http://evil.example"}, timeout=10)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


# --- the page in Chromium -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium: install it with scripts/system-deps.sh (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A fresh browser context on /viz with the API key already given, recording console errors."""

    def __init__(self, browser, server, url: str | None = None, key: str | None = KEY):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        if key:  # what the page's key form stores (an init script: the page's CSP forbids inline scripts)
            self.context.add_init_script(f"sessionStorage.setItem('nsbridge.apiKey', {json.dumps(key)})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url or server.base_url + "/viz")

    def run(self, prompt: str = PROMPT, max_tokens: int = 3):
        p = self.page
        p.wait_for_selector("body[data-ready='1']", timeout=30000)
        p.fill("#prompt", prompt)
        p.fill("#max-tokens", str(max_tokens))
        p.click("#run")
        p.wait_for_selector("body[data-run]", timeout=60000)
        return p.get_attribute("body", "data-run")

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, server):
    pg = Page(browser, server)
    yield pg
    pg.close()


@pytest.mark.browser
def test_page_draws_heads_and_shows_the_api_numbers(page, server, head, tmp_path):
    p = page.page
    cid = page.run()
    assert p.locator("canvas.head").count() == N_LAYERS * N_HEADS
    p.wait_for_selector(f"canvas.head[data-layer='{N_LAYERS - 1}'][data-drawn='1']", timeout=20000)
    assert p.locator("canvas.head[data-drawn='1']").count() == N_LAYERS * N_HEADS
    tokens = p.locator("#tokens .tok")
    with arrow(server, cid) as cap:
        assert tokens.count() == len(cap.tokens)
        assert [tokens.nth(i).text_content() for i in range(len(cap.tokens))] == cap.tokens
        pattern = cap["L1.pattern"].data.copy()  # [T_q, H, T_k]
        residuals = np.stack([cap[f"L{n}.resid"].data for n in range(N_LAYERS)])
        positions = cap.position.tolist()
        token_texts = cap.tokens

    # A clicked head: its destination x source matrix, every hovered value the API's number.
    p.click("canvas.head[data-layer='1'][data-head='2']")
    detail = p.locator("#detail-canvas")
    p.wait_for_selector("#detail-canvas[data-layer='1'][data-head='2']")
    cell, ox, oy = (float(detail.get_attribute(a)) for a in ("data-cell", "data-ox", "data-oy"))
    for i, j in ((5, 2), (len(positions) - 1, 0), (3, 3), (7, 1)):
        detail.hover(position={"x": ox + (j + 0.5) * cell, "y": oy + (i + 0.5) * cell})
        hover = p.locator("#detail-hover")
        assert hover.get_attribute("data-row") == str(i) and hover.get_attribute("data-key") == str(j)
        assert float(hover.get_attribute("data-value")) == pytest.approx(float(pattern[i, 2, j]), rel=1e-6, abs=1e-9)
        assert json.dumps(token_texts[j]) in hover.text_content()

    # The logit lens, as the page shows it: the top-k of numpy's final norm + unembedding.
    p.wait_for_selector(f"body[data-lens='{cid}']", timeout=60000)
    ref_ids, ref_probs = numpy_lens(head, residuals, 5)
    lens = p.locator("#lens-canvas")
    left, top, w, h = (float(lens.get_attribute(a)) for a in ("data-left", "data-top", "data-w", "data-h"))
    for layer, pos in ((0, 1), (1, 4), (N_LAYERS - 1, len(positions) - 2)):
        lens.hover(position={"x": left + (pos + 0.5) * w, "y": top + (layer + 0.5) * h})
        out = p.locator("#lens-hover")
        assert out.get_attribute("data-layer") == str(layer) and out.get_attribute("data-position") == str(pos)
        assert [int(x) for x in out.get_attribute("data-ids").split(",")][0] == ref_ids[layer, pos, 0]
        shown = [float(x.split()[-1]) for x in out.text_content().split("→")[1].split("  ") if x.strip()]
        np.testing.assert_allclose(shown, ref_probs[layer, pos], atol=1e-4)

    shot = tmp_path / "viz.png"
    p.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.errors == []


@pytest.mark.browser
def test_tokens_appear_while_the_stream_runs(page, server):
    """The generated text grows token by token while the stream is open (the span's data-tokens
    counts the tokens shown so far), each state a prefix of the final greedy text, before the
    run ends and the text is replaced by the capture's tokens."""
    max_tokens = 200  # about a second of streaming on the tiny model (its context is 256 tokens)
    p = page.page
    p.wait_for_selector("body[data-ready='1']", timeout=30000)
    p.fill("#prompt", PROMPT)
    p.fill("#max-tokens", str(max_tokens))
    p.click("#run")
    span = p.wait_for_selector("#tokens .tok.gen[data-tokens]", state="attached", timeout=60000)
    seen: list[tuple[int, str]] = []  # (tokens shown, text), each change once
    deadline = time.monotonic() + 120
    while True:  # one read per poll, so the count, the text and the run's end agree
        n, text, done = span.evaluate("e => [Number(e.dataset.tokens), e.textContent, 'run' in document.body.dataset]")
        if done:
            break
        assert time.monotonic() < deadline, "the run did not finish"
        if not seen or seen[-1][0] != n:
            seen.append((n, text))
    final_n = int(span.get_attribute("data-tokens"))  # the span is detached now: its last state
    r = requests.post(server.base_url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    out = r.json()
    final_text = out["choices"][0]["message"]["content"]
    assert span.text_content() == final_text
    partial = [(n, text) for n, text in seen if n < final_n]
    assert len(partial) >= 2, f"saw only {seen[:5]} of {final_n} tokens while streaming"
    assert [n for n, _ in seen] == sorted({n for n, _ in seen})  # only ever grew
    for (_, shorter), (_, longer) in zip(seen, seen[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert final_text.startswith(partial[-1][1]) and len(partial[-1][1]) < len(final_text)
    # Once the run ends the text gives way to the capture's tokens, one span per position.
    assert p.locator("#tokens .tok").count() == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert page.errors == []


@pytest.mark.browser
def test_tokens_coloured_by_residual_norm_neuron_and_attention(page, server):
    p = page.page
    cid = page.run()
    with arrow(server, cid) as cap:
        norms = np.linalg.norm(cap["L1.resid"].data.astype(np.float64), axis=-1)
        neuron = cap["L2.mlp"].data[:, 7].copy()
        attn = cap["L0.pattern"].data[:, 3, 2].copy()
    tokens = p.locator("#tokens .tok")
    from playwright.sync_api import expect

    def values():
        return np.array([float(tokens.nth(i).get_attribute("data-value")) for i in range(tokens.count())])

    legend = expect(p.locator("#colour-legend"))
    p.fill("#colour-layer", "1")
    p.select_option("#colour-mode", "resid")
    legend.to_have_text("‖residual‖ after layer 1")
    np.testing.assert_allclose(values(), norms, rtol=1e-5)
    p.select_option("#colour-mode", "neuron")
    p.fill("#colour-layer", "2")
    p.fill("#colour-neuron", "7")
    legend.to_have_text("layer 2 neuron 7")
    np.testing.assert_allclose(values(), neuron, rtol=1e-6, atol=1e-7)
    p.select_option("#colour-mode", "attn")
    p.fill("#colour-layer", "0")
    p.fill("#colour-head", "3")
    p.click("#tokens .tok[data-pos='2']")  # the source token: clicked
    legend.to_have_text("attention of L0H3 to position 2")
    assert p.locator("#tokens .tok.source").get_attribute("data-pos") == "2"
    np.testing.assert_allclose(values(), attn, rtol=1e-6, atol=1e-9)
    assert page.errors == []


@pytest.mark.browser
def test_steering_shows_steered_and_baseline(page, server):
    p = page.page
    page.run(max_tokens=4)
    p.fill("#steer-site", "blocks.1.attn.hook_z")
    p.select_option("#steer-op", "scale")
    p.fill("#steer-coef", "0")
    p.fill("#steer-heads", "0,2")
    p.click("#steer-run")
    p.wait_for_selector("#baseline[data-text]", timeout=60000)
    r = requests.post(server.base_url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "baseline": True, "logprobs": True,
        "interventions": [{"layer_name": "blocks.1.attn.hook_z", "op": "scale", "coefficient": 0, "heads": [0, 2]}]})
    out = r.json()
    assert p.get_attribute("#steered", "data-text") == out["choices"][0]["message"]["content"]
    assert p.get_attribute("#baseline", "data-text") == out["baseline"]["choices"][0]["message"]["content"]
    lps = p.locator("#steered .lp")
    assert lps.count() == len(out["choices"][0]["logprobs"]["content"])
    assert float(lps.nth(0).text_content()) == pytest.approx(out["choices"][0]["logprobs"]["content"][0]["logprob"],
                                                             abs=0.006)
    # A stored vector made from the capture, added back: the form's other path.
    p.fill("#steer-site", "blocks.1.hook_resid_post")
    p.fill("#steer-heads", "")
    p.click("#steer-make-vector")
    p.wait_for_selector("#steer-vector option", state="attached")
    p.select_option("#steer-op", "add")
    p.fill("#steer-coef", "3")
    p.click("#steer-run")
    p.wait_for_selector("#baseline[data-text]", timeout=60000)
    assert p.get_attribute("#steered", "data-text") is not None
    assert page.errors == []


@pytest.mark.browser
def test_link_reloads_the_request_and_view(page, browser, server):
    p = page.page
    page.run(prompt="Once upon a time", max_tokens=2)
    p.click("canvas.head[data-layer='2'][data-head='1']")
    p.wait_for_selector("#detail-canvas[data-layer='2'][data-head='1']")
    p.fill("#colour-layer", "1")
    p.select_option("#colour-mode", "resid")
    p.click("#share")
    url = p.input_value("#share-url")
    assert "#v=" in url and "Once" not in url  # encoded, not plain text
    again = Page(browser, server, url)
    try:
        q = again.page
        q.wait_for_selector("body[data-run]", timeout=60000)
        q.wait_for_selector("#detail-canvas[data-layer='2'][data-head='1']", timeout=20000)
        assert q.input_value("#prompt") == "Once upon a time" and q.input_value("#max-tokens") == "2"
        assert q.input_value("#colour-mode") == "resid" and q.input_value("#colour-layer") == "1"
        assert q.get_attribute("body", "data-run") != p.get_attribute("body", "data-run")  # a new run
        assert again.errors == []
    finally:
        again.close()


@pytest.mark.browser
def test_api_key_is_asked_once_and_sent(browser, server):
    pg = Page(browser, server, key=None)
    try:
        p = pg.page
        p.wait_for_selector("#key-form:not([hidden])", timeout=20000)
        assert "API key" in p.text_content("#status")
        p.fill("#api-key", KEY)
        p.click("#key-form button")
        p.wait_for_selector("body[data-ready='1']", timeout=20000)
        assert "tiny" in p.text_content("#model")
        p.reload()  # kept for the session: not asked again
        p.wait_for_selector("body[data-ready='1']", timeout=20000)
        assert p.is_hidden("#key-form")
        # The only error is the browser's own log line for the first, keyless request's 401.
        assert all("401" in e for e in pg.errors) and len(pg.errors) == 1
    finally:
        pg.close()


@pytest.mark.browser
def test_attribution_heatmap(page, server):
    p = page.page
    p.wait_for_selector("body[data-ready='1']", timeout=30000)
    p.fill("#attr-clean", "When John and Mary went")
    p.fill("#attr-corrupted", "When Mary and John went")
    p.fill("#attr-a", "5")
    p.fill("#attr-b", "6")
    p.click("#attr-run")
    p.wait_for_selector("#attr-maps canvas", timeout=60000)
    maps = p.locator("#attr-maps canvas")
    assert sorted(maps.nth(i).get_attribute("data-component") for i in range(maps.count())) == \
        ["attention", "mlp", "residual"]
    r = requests.post(server.base_url + "/v1/attribution", headers=AUTH, timeout=60, json={
        "clean": {"prompt": "When John and Mary went"}, "corrupted": {"prompt": "When Mary and John went"},
        "metric": {"type": "logit_diff", "token_ids": [5, 6]}})
    rows = [a for a in r.json()["attributions"] if a["component"] == "mlp" and a["layer_name"].startswith("blocks.1.")]
    row = max(rows, key=lambda a: abs(a["estimate"]))
    canvas = p.locator("#attr-maps canvas[data-component='mlp']")
    left, top, w, h = (float(canvas.get_attribute(a)) for a in ("data-left", "data-top", "data-w", "data-h"))
    canvas.hover(position={"x": left + (row["position"] + 0.5) * w, "y": top + (1 + 0.5) * h})
    text = p.text_content("#attr-hover")
    assert f"layer 1 position {row['position']}" in text
    assert float(text.rsplit(":", 1)[1]) == pytest.approx(row["estimate"], rel=1e-3, abs=1e-6)
    assert page.errors == []
