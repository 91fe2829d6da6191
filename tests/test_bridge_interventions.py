"""The Python client's interventions, baseline comparison, log-probabilities, stored vectors
and activation-patching sweep, against a real server (its own, on loopback) with the tiny
random llama (3 layers, 4 heads, d_model 64).

chat() and generate_with_activations() take a chat (`messages`; a str is one user message) or a
raw prompt (`prompt=`); the analysis methods (logit_difference, patching_sweep) read a str as a
raw prompt and a list of message dicts as a chat: the tests through the chat template pass
CLEAN_CHAT / CORRUPTED_CHAT to them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from bridge import (
    ActivationResult,
    ChatCompletion,
    LMStudioNeuroScopeClient,
    NeuroScopeActivationBridge,
    NeuroScopeServerError,
    PatchingResult,
)
from tests.conftest import ServerProcess
from tests.gguf_writer import controlvector_bytes

CLEAN = "John gave Mary the book"
CORRUPTED = "Mary gave John the book"  # the same number of tokens (checked below)
CLEAN_CHAT = [{"role": "user", "content": CLEAN}]  # the same prompts through the chat template
CORRUPTED_CHAT = [{"role": "user", "content": CORRUPTED}]
ZERO_LAST = [{"layer_name": "blocks.2.hook_resid_post", "op": "zero"}]  # the strongest change there is
N_LAYERS, N_HEADS, D_MODEL = 3, 4, 64


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    s = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("interventions-server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = LMStudioNeuroScopeClient(server.base_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ids(client):
    """(target, foil): the greedy next token of the clean prompt and of the corrupted one, so
    the two prompts' logit differences have opposite signs (picked with the model's own
    tokenizer, through a plain generation)."""
    top_clean = client.chat(CLEAN, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5)
    top_corrupted = client.chat(CORRUPTED, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5)
    assert top_clean["usage"]["prompt_tokens"] == top_corrupted["usage"]["prompt_tokens"]
    target = top_clean.logprobs[0]["token_id"]
    foil = top_corrupted.logprobs[0]["token_id"]
    if foil == target:
        foil = next(e["token_id"] for e in top_clean.logprobs[0]["top_logprobs"] if e["token_id"] != target)
    return target, foil


def live_capture_ids(client) -> set[str]:
    return {s["capture_id"] for s in client.list_captures()["segments"]}


# --- interventions and their report ---------------------------------------------------------
def test_interventions_are_sent_and_reported(client):
    ivs = [{"layer_name": "blocks.2.hook_resid_post", "op": "zero", "positions": "prompt"},
           {"layer_name": "blocks.0.hook_mlp_out", "op": "scale", "coefficient": np.float32(0.5)}]
    r = client.chat(CLEAN, max_tokens=3, temperature=0.0, interventions=ivs)
    assert isinstance(r, ChatCompletion) and r.baseline is None and r.logprobs is None
    prompt = r["usage"]["prompt_tokens"]
    report = r.interventions
    assert [(x["index"], x["layer_name"], x["op"]) for x in report] == [
        (0, "blocks.2.hook_resid_post", "zero"), (1, "blocks.0.hook_mlp_out", "scale")]
    assert report[0]["component"] == "residual" and report[1]["component"] == "mlp"
    assert report[0]["positions_touched"][0] == prompt and not any(report[0]["positions_touched"][1:])
    assert report[1]["positions_touched"][0] == prompt and all(n == 1 for n in report[1]["positions_touched"][1:])
    # nothing sent, nothing reported
    plain = client.chat(CLEAN, max_tokens=3, temperature=0.0)
    assert plain.interventions == [] and "interventions" not in plain


def test_capture_records_the_intervened_run(client):
    r = client.generate_with_activations(CLEAN, ["blocks.2.hook_resid_post", "blocks.1.hook_resid_post"],
                                         max_tokens=2, temperature=0.0, interventions=ZERO_LAST)
    assert isinstance(r, ActivationResult) and r.interventions[0]["op"] == "zero"
    assert all(not a.any() for a in r.arrays("blocks.2.hook_resid_post"))
    assert all(a.any() for a in r.arrays("blocks.1.hook_resid_post"))


def test_bad_intervention_is_a_typed_400(client):
    with pytest.raises(NeuroScopeServerError) as info:
        client.chat(CLEAN, max_tokens=1, interventions=[{"layer_name": "blocks.0.hook_resid_mid", "op": "zero"}])
    assert info.value.status == 400 and info.value.param == "interventions[0].layer_name"
    with pytest.raises(TypeError):
        client.chat(CLEAN, max_tokens=1, interventions=["blocks.0.hook_resid_post"])


# --- baseline ----------------------------------------------------------------------------------
def test_baseline_equals_a_plain_request_with_the_same_seed(client):
    kw = dict(max_tokens=8, temperature=1.0, seed=1234, logprobs=True, top_logprobs=3)
    steered = client.chat(CLEAN, interventions=ZERO_LAST, baseline=True, **kw)
    plain = client.chat(CLEAN, **kw)
    base = steered.baseline
    assert isinstance(base, ChatCompletion) and base.baseline is None
    assert base.text == plain.text and base.logprobs == plain.logprobs and base["usage"] == plain["usage"]
    assert len(plain.logprobs) == 8
    assert steered.text != plain.text
    assert [e["token_id"] for e in steered.logprobs] != [e["token_id"] for e in plain.logprobs]
    assert steered.interventions[0]["op"] == "zero"

    # compare_with_baseline: the same in one call
    s2, b2 = client.compare_with_baseline(CLEAN, ZERO_LAST, **kw)
    assert (s2.text, s2.logprobs) == (steered.text, steered.logprobs)
    assert (b2.text, b2.logprobs) == (plain.text, plain.logprobs)


def test_baseline_streamed_and_with_activations(client):
    kw = dict(max_tokens=4, temperature=0.0, logprobs=True)
    full = client.chat(CLEAN, interventions=ZERO_LAST, baseline=True, **kw)
    stream = client.chat(CLEAN, interventions=ZERO_LAST, baseline=True, stream=True, **kw)
    assert "".join(stream) == full.text
    assert stream.logprobs == full.logprobs and stream.interventions == full.interventions
    assert stream.baseline.text == full.baseline.text and stream.baseline.logprobs == full.baseline.logprobs

    act = client.generate_with_activations(CLEAN, ["blocks.1.hook_resid_post"], interventions=ZERO_LAST,
                                           baseline=True, **kw)
    assert act.text == full.text and act.baseline.text == full.baseline.text and act.logprobs == full.logprobs
    res = client.generate_with_activations(CLEAN, ["blocks.1.hook_resid_post"], interventions=ZERO_LAST,
                                           baseline=True, stream=True, **kw).result()
    assert res.text == full.text and res.baseline.text == full.baseline.text
    assert res.logprobs == full.logprobs and res.interventions[0]["op"] == "zero"
    with client.generate_with_activations(CLEAN, ["blocks.1.hook_resid_post"], transport="shm",
                                          interventions=ZERO_LAST, baseline=True, **kw) as cap:
        assert cap.baseline.text == full.baseline.text and cap.interventions[0]["op"] == "zero"
        assert cap.logprobs == full.logprobs


# --- log-probabilities and logit differences ------------------------------------------------
def test_logit_difference(client, ids):
    target, foil = ids
    r = client.chat(CLEAN, max_tokens=1, temperature=0.0, logprob_token_ids=[target, foil])
    got = {e["token_id"]: e["logprob"] for e in r.logprobs[0]["target_logprobs"]}
    ld = client.logit_difference(CLEAN_CHAT, target, foil)  # a list of messages: through the chat template
    assert ld == got[target] - got[foil] and ld > 0
    assert client.logit_difference(CLEAN_CHAT, np.int64(target), foil) == ld
    assert client.logit_difference(CLEAN_CHAT, target, target) == 0.0
    assert client.logit_difference(CORRUPTED_CHAT, target, foil) < 0
    assert client.logit_difference(CLEAN_CHAT, target, foil, interventions=ZERO_LAST) != ld
    assert client.logit_difference(CLEAN, target, foil) != ld  # a str: the raw prompt, no template
    with pytest.raises(TypeError, match="tokenize"):
        client.logit_difference(CLEAN_CHAT, " book", foil)


# --- stored vectors --------------------------------------------------------------------------
def test_vectors_crud_and_errors(client):
    before = {v["vector_id"] for v in client.list_vectors()}
    values = [float(i) / 64 for i in range(D_MODEL)]
    a = client.create_vector(values, name="ramp", layer=2)
    assert a["vector_id"].startswith("vec_") and a["name"] == "ramp" and a["layer"] == 2
    assert a["shape"] == [D_MODEL] and a["dtype"] == "float32" and a["norm"] == pytest.approx(np.linalg.norm(values))
    b = client.create_vector(np.ones(D_MODEL, np.float32))
    listed = {v["vector_id"]: v for v in client.list_vectors()}
    assert set(listed) - before == {a["vector_id"], b["vector_id"]} and "vector" not in listed[a["vector_id"]]
    got = client.get_vector(a["vector_id"])
    assert got["vector"].dtype == np.float32 and np.array_equal(got["vector"], np.asarray(values, np.float32))

    # stored and inline vectors steer the same
    add_id = [{"layer_name": "blocks.1.hook_resid_post", "op": "add", "vector_id": a, "coefficient": 50.0}]
    add_inline = [{"layer_name": "blocks.1.hook_resid_post", "op": "add", "vector": np.asarray(values, np.float32),
                   "coefficient": 50.0}]
    kw = dict(max_tokens=4, temperature=0.0, logprobs=True)
    r_id, r_inline, plain = (client.chat(CLEAN, interventions=add_id, **kw),
                             client.chat(CLEAN, interventions=add_inline, **kw), client.chat(CLEAN, **kw))
    assert r_id.logprobs == r_inline.logprobs and r_id.logprobs != plain.logprobs

    assert client.delete_vector(a["vector_id"]) == {"vector_id": a["vector_id"], "status": "deleted"}
    assert client.request("POST", f"/v1/vectors/{b['vector_id']}/delete") == {"vector_id": b["vector_id"],
                                                                             "status": "deleted"}
    assert {v["vector_id"] for v in client.list_vectors()} == before
    for call in (lambda: client.get_vector(a), lambda: client.delete_vector(b["vector_id"]),
                 lambda: client.request("POST", f"/v1/vectors/{a['vector_id']}/delete")):
        with pytest.raises(NeuroScopeServerError) as info:
            call()
        assert (info.value.status, info.value.code) == (404, "vector_not_found"), info.value
        assert a["vector_id"] in info.value.message or b["vector_id"] in info.value.message
    with pytest.raises(NeuroScopeServerError) as info:  # an intervention naming a gone vector: a bad request
        client.chat(CLEAN, max_tokens=1, interventions=add_id)
    assert info.value.status == 400 and info.value.param.startswith("interventions[0]")
    assert a["vector_id"] in info.value.message

    with pytest.raises(NeuroScopeServerError) as info:
        client.create_vector([1.0, 2.0, 3.0])
    assert info.value.status == 400 and info.value.param == "vector"
    with pytest.raises(ValueError):
        client.create_vector(values, data=b"\0" * 256)
    with pytest.raises(ValueError):
        client.create_vector()


def test_numpy_vector_round_trips_exactly(client):
    rng = np.random.default_rng(7)
    for arr in (rng.standard_normal(D_MODEL).astype(np.float32) * 1e3,
                rng.standard_normal((N_HEADS, 16)).astype(np.float32),  # per head [heads, d_head]
                np.array([np.float32(1) / 3, np.finfo(np.float32).tiny, -0.0] + [1e-30] * 61, np.float32)):
        desc = client.create_vector(arr, name="np")
        assert desc["shape"] == list(arr.shape) and desc["source"]["kind"] == "base64"
        back = client.get_vector(desc)["vector"]
        assert back.dtype == np.float32 and back.shape == arr.shape and back.tobytes() == arr.tobytes()
        client.delete_vector(desc)
    half = rng.standard_normal(D_MODEL).astype(np.float16)
    desc = client.create_vector(half)
    assert desc["source"]["dtype"] == "float16"
    assert client.get_vector(desc)["vector"].tobytes() == half.astype(np.float32).tobytes()
    f64 = rng.standard_normal(D_MODEL)  # float64 goes as float32 (what the server stores)
    assert client.get_vector(client.create_vector(f64))["vector"].tobytes() == f64.astype(np.float32).tobytes()
    raw = rng.standard_normal(D_MODEL).astype("<f4")
    assert client.get_vector(client.create_vector(data=raw.tobytes()))["vector"].tobytes() == raw.tobytes()


def test_vector_from_capture_is_the_mean_of_the_shm_array(client):
    hooks = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    with client.generate_with_activations(CLEAN, hooks, max_tokens=3, temperature=0.0, transport="shm") as cap:
        assert cap.zero_copy
        resid = np.array(cap.array("blocks.1.hook_resid_post"))
        z = np.array(cap.array("blocks.1.attn.hook_z"))
        prompt = cap["usage"]["prompt_tokens"]
        position = np.array(cap.position)
        mean = client.create_vector(from_capture={"capture_id": cap, "hook_id": "blocks.1.hook_resid_post"},
                                    name="mean")
        prompt_last = client.create_vector(from_capture={"capture_id": cap.capture_id,
                                                         "hook_id": "blocks.1.attn.hook_z",
                                                         "reduce": "last", "positions": "prompt"})
    assert mean["source"]["kind"] == "capture" and mean["source"]["count"] == len(resid) and mean["layer"] == 1
    got = client.get_vector(mean)["vector"]
    assert np.allclose(got, resid.mean(axis=0), rtol=0, atol=1e-6)
    assert np.array_equal(got, resid.astype(np.float64).mean(axis=0).astype(np.float32))  # the server's rounding
    per_head = client.get_vector(prompt_last)["vector"]
    assert per_head.shape == (N_HEADS, 16) and np.array_equal(per_head, z[position == prompt - 1][0])
    # the capture is released: no more vectors from it
    with pytest.raises(NeuroScopeServerError) as info:
        client.create_vector(from_capture={"capture_id": cap.capture_id, "hook_id": "blocks.1.hook_resid_post"})
    assert info.value.status in (400, 404)


def test_import_control_vector(client, tmp_path):
    rng = np.random.default_rng(3)
    directions = {n: rng.standard_normal(D_MODEL).astype(np.float32) for n in (1, 2)}
    path = tmp_path / "happy.gguf"
    path.write_bytes(controlvector_bytes(directions))
    vecs = client.import_control_vector(path)
    assert [v["layer"] for v in vecs] == [1, 2]
    assert [v["name"] for v in vecs] == ["happy.direction.1", "happy.direction.2"]
    for v in vecs:
        assert client.get_vector(v)["vector"].tobytes() == directions[v["layer"]].tobytes()
    named = client.import_control_vector(path.read_bytes(), name="joy")
    assert [v["name"] for v in named] == ["joy.direction.1", "joy.direction.2"]
    unnamed = client.import_control_vector(path.read_bytes())
    assert [v["name"] for v in unnamed] == ["controlvector.direction.1", "controlvector.direction.2"]
    for v in vecs + named + unnamed:
        client.delete_vector(v)


# --- activation patching -------------------------------------------------------------------
def test_patching_resid_pre_layer0_restores_the_clean_run(client, ids):
    target, foil = ids
    before = live_capture_ids(client)
    res = client.patching_sweep(CLEAN_CHAT, CORRUPTED_CHAT, target, foil, site="resid_pre")
    assert isinstance(res, PatchingResult) and res.site == "resid_pre" and res.layers == [0, 1, 2]
    assert res.hook_names == [f"blocks.{i}.hook_resid_pre" for i in range(N_LAYERS)] and res.heads is None
    assert res.clean == pytest.approx(client.logit_difference(CLEAN_CHAT, target, foil), abs=1e-5)
    assert res.corrupted == pytest.approx(client.logit_difference(CORRUPTED_CHAT, target, foil), abs=1e-5)
    assert res.clean > 0 > res.corrupted
    assert res.effects.shape == res.normalized.shape == (N_LAYERS,)
    # layer 0's input at every prompt position is the whole clean prompt: the clean answer, exactly
    assert abs(res.normalized[0] - 1.0) < 1e-4 and res.effects[0] == pytest.approx(res.clean, abs=1e-4)
    # the whole residual stream at every later layer carries everything too
    assert np.allclose(res.normalized, 1.0, atol=1e-4)
    assert live_capture_ids(client) == before  # the clean capture was released

    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d and d["site"] == "resid_pre" and len(d["normalized"]) == N_LAYERS

    # a component site: partial effects, patching the last layer only
    mlp = client.patching_sweep(CLEAN_CHAT, CORRUPTED_CHAT, target, foil, site="mlp_out", layers=[-1])
    assert mlp.layers == [2] and mlp.effects.shape == (1,) and mlp.clean == res.clean
    manual = client.logit_difference(CORRUPTED_CHAT, target, foil, interventions=[{
        "layer_name": "blocks.2.hook_mlp_out", "op": "zero"}])
    assert np.isfinite(manual)  # the site resolves for interventions too
    assert live_capture_ids(client) == before


def test_patching_heads_sweep_shape(client, ids):
    target, foil = ids
    before = live_capture_ids(client)
    res = client.patching_sweep(CLEAN_CHAT, CORRUPTED_CHAT, target, foil, site="head")
    assert res.heads == list(range(N_HEADS)) and res.layers == list(range(N_LAYERS))
    assert res.effects.shape == res.normalized.shape == (N_LAYERS, N_HEADS)
    assert np.isfinite(res.effects).all()
    assert np.allclose(res.normalized, (res.effects - res.corrupted) / (res.clean - res.corrupted))
    assert not np.allclose(res.effects, res.corrupted)  # some head matters
    # one cell by hand: the same patch as an explicit intervention
    with client.generate_with_activations(CLEAN, ["blocks.1.attn.hook_z"], max_tokens=1, temperature=0.0,
                                          transport="shm") as cap:
        one = client.logit_difference(CORRUPTED_CHAT, target, foil, interventions=[{
            "layer_name": "blocks.1.attn.hook_z", "op": "patch", "heads": [2], "positions": "prompt",
            "source": {"capture_id": cap, "hook_id": "blocks.1.attn.hook_z"}}])
    assert one == pytest.approx(res.effects[1, 2], abs=1e-5)
    assert live_capture_ids(client) == before
    assert len(res.to_dict()["effects"]) == N_LAYERS and len(res.to_dict()["effects"][0]) == N_HEADS


def test_patching_releases_the_capture_on_error(client, ids):
    target, foil = ids
    before = live_capture_ids(client)
    with pytest.raises(ValueError, match="same length"):
        client.patching_sweep(CLEAN, "John gave Mary the book and a very long letter too", target, foil)
    assert live_capture_ids(client) == before
    with pytest.raises(NeuroScopeServerError) as info:  # the server refuses a patched run mid-sweep
        client.patching_sweep(CLEAN, CORRUPTED, target, foil, positions=[10_000])
    assert info.value.status == 400 and info.value.param.startswith("interventions[0]")
    assert live_capture_ids(client) == before
    with pytest.raises(ValueError):
        client.patching_sweep(CLEAN, CORRUPTED, target, foil, site="hook_q")
    with pytest.raises(ValueError):
        client.patching_sweep(CLEAN, CORRUPTED, target, foil, layers=[N_LAYERS])
    assert live_capture_ids(client) == before


# --- the bridge's pass-throughs ------------------------------------------------------------
def test_bridge_pass_throughs(client, ids):
    target, foil = ids
    b = NeuroScopeActivationBridge(client)
    r = b.intervene(CLEAN, ZERO_LAST, max_tokens=2, temperature=0.0, baseline=True)
    assert r.interventions[0]["op"] == "zero" and r.baseline is not None
    steered, base = b.compare_with_baseline(CLEAN, ZERO_LAST, max_tokens=2, temperature=0.0)
    assert (steered.text, base.text) == (r.text, r.baseline.text)
    vec = b.create_steering_vector(np.ones(D_MODEL, np.float32), name="steer", layer=1)
    assert vec["name"] == "steer" and vec["vector_id"] in {v["vector_id"] for v in b.list_vectors()}
    assert np.array_equal(b.get_vector(vec)["vector"], np.ones(D_MODEL, np.float32))
    assert b.delete_vector(vec)["status"] == "deleted"
    assert b.logit_difference(CLEAN_CHAT, target, foil) == client.logit_difference(CLEAN_CHAT, target, foil)
    assert b.logit_difference(CLEAN, target, foil) == client.logit_difference(CLEAN, target, foil)
    res = b.patching_sweep(CLEAN_CHAT, CORRUPTED_CHAT, target, foil, site="attn_out", layers=[0])
    assert res.site == "attn_out" and res.effects.shape == (1,)
    with pytest.raises(ValueError, match="no client"):
        NeuroScopeActivationBridge().intervene(CLEAN, ZERO_LAST)
    # raw prompts pass through too
    raw = b.intervene(prompt=CLEAN, interventions=ZERO_LAST, max_tokens=2, temperature=0.0, baseline=True)
    assert raw.text == client.chat(prompt=CLEAN, interventions=ZERO_LAST, max_tokens=2, temperature=0.0).text
    steered, base = b.compare_with_baseline(prompt=CLEAN, interventions=ZERO_LAST, max_tokens=2, temperature=0.0)
    assert (steered.text, base.text) == (raw.text, raw.baseline.text)
    ns = b.capture(prompt=CLEAN, hooks=["blocks.1.hook_resid_post"], max_tokens=2, temperature=0.0)
    assert ns["text"] == client.chat(prompt=CLEAN, max_tokens=2, temperature=0.0).text
    assert ns["prompt_tokens"] == client.chat(prompt=CLEAN, max_tokens=1)["usage"]["prompt_tokens"]


# --- raw prompts (`prompt` instead of `messages`: no chat template) --------------------------
def _post(server, path, body):
    r = requests.post(server.base_url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def raw_ids(client):
    """(target, foil) for the raw prompts: the greedy next token of each, as `ids` does through
    the chat template."""
    top_clean = client.chat(prompt=CLEAN, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5)
    top_corrupted = client.chat(prompt=CORRUPTED, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5)
    assert top_clean["usage"]["prompt_tokens"] == top_corrupted["usage"]["prompt_tokens"]  # equal lengths raw too
    target = top_clean.logprobs[0]["token_id"]
    foil = top_corrupted.logprobs[0]["token_id"]
    if foil == target:
        foil = next(e["token_id"] for e in top_clean.logprobs[0]["top_logprobs"] if e["token_id"] != target)
    return target, foil


def test_raw_prompt_round_trip(client, server, raw_ids):
    target, foil = raw_ids
    kw = dict(max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=2)
    direct = _post(server, "/v1/chat/completions", {"prompt": CLEAN, **kw})
    raw = client.chat(prompt=CLEAN, **kw)
    assert raw["choices"] == direct["choices"] and raw["usage"] == direct["usage"]
    templated = client.chat(CLEAN, **kw)  # a bare str in chat(): one user message, through the template
    assert templated["usage"]["prompt_tokens"] > raw["usage"]["prompt_tokens"]
    assert "".join(client.chat(prompt=CLEAN, stream=True, **kw)) == raw.text

    # with activations: the same body as a direct POST; the prompt's token ids continue the same way
    hooks = ["blocks.1.hook_resid_post"]
    act = client.generate_with_activations(prompt=CLEAN, activation_hooks=hooks, max_tokens=3, temperature=0.0)
    direct_act = _post(server, "/v1/chat/completions/with_activations",
                       {"prompt": CLEAN, "max_tokens": 3, "temperature": 0.0, "activations_transport": "inline",
                        "activation_hooks": [{"layer_name": h} for h in hooks]})
    assert act.text == raw.text and act.token_ids == direct_act["token_ids"] and act.tokens == direct_act["tokens"]
    assert [a.tolist() for a in act.arrays(hooks[0])] == [
        a.tolist() for a in ActivationResult(direct_act).arrays(hooks[0])]
    n = raw["usage"]["prompt_tokens"]
    prompt_ids = act.token_ids[:n]
    by_ids = client.chat(prompt=prompt_ids, **kw)
    assert by_ids["choices"] == raw["choices"] and by_ids["usage"] == raw["usage"]
    assert client.chat(prompt=np.asarray(prompt_ids), **kw)["choices"] == raw["choices"]
    with client.generate_with_activations(prompt=CLEAN, activation_hooks=hooks, max_tokens=1, temperature=0.0,
                                          transport="shm") as cap:
        assert cap["usage"]["prompt_tokens"] == n

    # the analysis methods read a str (or token ids) as the raw prompt
    got = {e["token_id"]: e["logprob"] for e in _post(server, "/v1/chat/completions", {
        "prompt": CLEAN, "max_tokens": 1, "temperature": 0, "logprob_token_ids": [target, foil]})[
        "choices"][0]["logprobs"]["content"][0]["target_logprobs"]}
    ld = client.logit_difference(CLEAN, target, foil)
    assert ld == got[target] - got[foil]
    assert client.logit_difference(prompt_ids, target, foil) == ld
    assert client.logit_difference(CLEAN_CHAT, target, foil) != ld
    assert client.logit_difference(CLEAN, target, foil, interventions=ZERO_LAST) != ld

    # compare_with_baseline(prompt=...): the baseline is the plain raw run
    steered, base = client.compare_with_baseline(prompt=CLEAN, interventions=ZERO_LAST, **kw)
    assert base.text == raw.text and base.logprobs == raw.logprobs and steered.interventions[0]["op"] == "zero"


def test_raw_prompt_errors(client):
    for call in (lambda: client.chat(CLEAN, prompt=CLEAN, max_tokens=1),
                 lambda: client.chat(max_tokens=1),
                 lambda: client.chat(None, prompt=None),
                 lambda: client.generate_with_activations(CLEAN, ["blocks.0.hook_resid_post"], prompt=CLEAN),
                 lambda: client.generate_with_activations(activation_hooks=["blocks.0.hook_resid_post"]),
                 lambda: client.compare_with_baseline(CLEAN, ZERO_LAST, prompt=CLEAN),
                 lambda: client.compare_with_baseline(interventions=ZERO_LAST),
                 lambda: client.chat(CLEAN_CHAT, prompt=[1, 2], stream=True)):
        with pytest.raises(ValueError, match="messages.*prompt"):
            call()
    with pytest.raises(ValueError, match="not both"):
        client.chat(CLEAN, prompt=CLEAN)
    with pytest.raises(TypeError, match="token ids"):
        client.chat(prompt=[1, "two"])
    with pytest.raises(TypeError, match="token ids"):
        client.chat(prompt=3.5)
    with pytest.raises(TypeError, match="message dicts"):
        client.logit_difference({"role": "user", "content": CLEAN}, 1, 2)
    with pytest.raises(TypeError, match="message dicts"):
        client.patching_sweep(CLEAN, None, 1, 2)
    with pytest.raises(NeuroScopeServerError) as info:  # the server's own check: an empty prompt
        client.chat(prompt="", max_tokens=1)
    assert info.value.status == 400 and info.value.param == "prompt"


def test_patching_sweep_with_raw_prompts(client, server, raw_ids):
    target, foil = raw_ids
    before = live_capture_ids(client)
    res = client.patching_sweep(CLEAN, CORRUPTED, target, foil, site="resid_pre")
    assert res.clean == client.logit_difference(CLEAN, target, foil)
    assert res.corrupted == client.logit_difference(CORRUPTED, target, foil)
    assert res.clean != client.logit_difference(CLEAN_CHAT, target, foil)  # not the templated prompts
    assert abs(res.clean - res.corrupted) > 1e-3
    # resid_pre of layer 0 over every prompt position is the whole clean prompt: the clean answer
    assert abs(res.normalized[0] - 1.0) < 1e-4 and res.effects[0] == pytest.approx(res.clean, abs=1e-4)
    assert live_capture_ids(client) == before

    # the clean capture is a raw prompt too: the same patch by hand gives layer 0's effect
    site = "blocks.0.hook_resid_pre"
    clean = _post(server, "/v1/chat/completions/with_activations", {
        "prompt": CLEAN, "max_tokens": 1, "temperature": 0, "activations_transport": "shm",
        "activation_hooks": [{"layer_name": site, "hook_id": site}]})
    try:
        one = client.logit_difference(CORRUPTED, target, foil, interventions=[{
            "layer_name": site, "op": "patch", "positions": "prompt",
            "source": {"capture_id": clean["capture"]["capture_id"], "hook_id": site}}])
    finally:
        client.release(clean)
    assert one == pytest.approx(res.effects[0], abs=1e-5)

    # token ids work as raw prompts alike
    n = client.chat(prompt=CLEAN, max_tokens=1)["usage"]["prompt_tokens"]
    ids = [client.generate_with_activations(prompt=p, activation_hooks=[site], max_tokens=1,
                                            temperature=0.0).token_ids[:n] for p in (CLEAN, CORRUPTED)]
    by_ids = client.patching_sweep(ids[0], ids[1], target, foil, site="resid_pre", layers=[0])
    assert (by_ids.clean, by_ids.corrupted) == (res.clean, res.corrupted)
    assert by_ids.normalized[0] == pytest.approx(1.0, abs=1e-4)
    assert live_capture_ids(client) == before
