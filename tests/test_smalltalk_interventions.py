"""The Smalltalk client's interventions, stored vectors, logprobs and patching sweep, in a real Squeak VM.

- Without a model server: smalltalk/tests/interventions_unit.st. The intervention builders
  answer exactly the contract's JSON (written out here, independently, from the contract), and
  the requests the new methods send, recorded by a small HTTP server, have the contract's bodies
  and use only GET and POST.
- Against the tiny model's live server: smalltalk/tests/interventions_live.st runs a zero
  ablation, a head ablation, seeded steering with a baseline, stored vectors, logit differences
  and activation-patching sweeps, through the chat template and with raw prompts; Python then
  asks the server the same questions and compares.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from bridge import LMStudioNeuroScopeClient
from bridge.smalltalk import CHECKED_IN
from tests.smalltalk_support import ROOT, load_harness

ST_TESTS = ROOT / "smalltalk" / "tests"
CHAT = "/v1/chat/completions"
ACT = "/v1/chat/completions/with_activations"
PROMPT = "Hi"
CLEAN = "John gave Mary the book"
CORRUPTED = "Mary gave John the book"  # the same token count: the names swapped

st = load_harness()
_REASON = st.unavailable_reason()
pytestmark = [pytest.mark.squeak, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _user(text):
    return [{"role": "user", "content": text}]


# --- builders and requests, no model server -----------------------------------------------------
CAP = "cap_0123456789abcdef"
VEC = "vec_0123456789abcdef"
# What interventions_unit.st builds, in its order, as the contract spells each intervention.
CONTRACT_INTERVENTIONS = [
    {"layer_name": "blocks.0.hook_resid_pre", "op": "zero"},
    {"layer_name": "blocks.5.hook_resid_post", "op": "zero"},
    {"layer_name": "blocks.1.hook_resid_post", "op": "zero", "positions": "prompt"},
    {"layer_name": "blocks.1.hook_resid_post", "op": "zero", "positions": [0, 2, 4]},
    {"layer_name": "blocks.2.attn.hook_z", "op": "zero", "heads": [1, 3]},
    {"layer_name": "blocks.2.attn.hook_z", "op": "zero", "heads": [0], "positions": "generated"},
    {"layer_name": "blocks.3.mlp.hook_post", "op": "zero", "indices": [7, 11]},
    {"layer_name": "blocks.1.hook_attn_out", "op": "scale", "coefficient": 2.5},
    {"layer_name": "blocks.1.hook_attn_out", "op": "scale", "coefficient": 0, "positions": "generated"},
    {"layer_name": "blocks.4.hook_resid_post", "op": "add", "vector_id": VEC, "coefficient": 4},
    {"layer_name": "blocks.4.hook_resid_post", "op": "add", "vector": [0.5, -0.25, 1], "coefficient": -1.5,
     "positions": [3]},
    {"layer_name": "blocks.4.hook_resid_post", "op": "add", "vector_id": "vec_00000000000000ff", "coefficient": 1},
    {"layer_name": "blocks.2.attn.hook_z", "op": "add", "vector": [[1, 2], [3, 4]], "coefficient": 0.5},
    {"layer_name": "blocks.0.hook_resid_pre", "op": "set", "vector": [1, 2, 3]},
    {"layer_name": "blocks.6.hook_resid_post", "op": "project_out", "vector_id": VEC},
    {"layer_name": "blocks.6.hook_resid_post", "op": "project_out", "vector": [1, 0], "coefficient": 0.5},
    {"layer_name": "blocks.3.mlp.hook_post", "op": "clamp", "min": 0, "max": 1.5},
    {"layer_name": "blocks.3.mlp.hook_post", "op": "clamp", "max": 2},
    {"layer_name": "blocks.3.mlp.hook_post", "op": "clamp", "min": -1},
    {"layer_name": "blocks.0.hook_resid_pre", "op": "patch",
     "source": {"capture_id": CAP, "hook_id": "blocks.0.hook_resid_pre"}},
    {"layer_name": "blocks.0.hook_resid_pre", "op": "patch", "source": {"capture_id": CAP, "hook_id": "clean.resid"},
     "positions": "prompt"},
    {"layer_name": "blocks.1.attn.hook_z", "op": "patch", "source": {"capture_id": CAP, "hook_id": "blocks.1.attn.hook_z"},
     "heads": [2], "positions": "prompt"},
    {"layer_name": "model.layers.3", "component": "mlp", "op": "zero"},
]

# The requests interventions_unit.st sends to the recording server, in order: (method, path, body).
EXPECTED_REQUESTS = [
    ("POST", CHAT, {"messages": _user("Hi"), "max_tokens": 3, "temperature": 0,
                    "interventions": [{"layer_name": "blocks.0.hook_resid_pre", "op": "zero"}]}),
    ("POST", CHAT, {"messages": _user("Hi"), "max_tokens": 4, "temperature": 0.9, "baseline": True,
                    "interventions": [{"layer_name": "blocks.1.hook_resid_post", "op": "scale", "coefficient": 2}]}),
    ("POST", CHAT, {"messages": _user("Hi"), "max_tokens": 100, "temperature": 0.7, "baseline": True}),
    ("POST", ACT, {"activations_encoding": "base64", "messages": _user("Hi"), "max_tokens": 2, "temperature": 0,
                   "activation_hooks": [{"layer_name": "blocks.1.hook_resid_post", "hook_id": "blocks.1.hook_resid_post"}],
                   "interventions": [{"layer_name": "blocks.1.hook_resid_post", "op": "add", "vector_id": VEC,
                                      "coefficient": 3}]}),
    ("POST", CHAT, {"messages": _user("Hi"), "max_tokens": 1, "temperature": 0, "logprob_token_ids": [11, 12],
                    "interventions": [{"layer_name": "blocks.0.hook_resid_post", "op": "zero"}]}),
    ("POST", "/v1/vectors", {"vector": [0.5, 1, -2], "name": "v", "layer": 3}),
    ("POST", "/v1/vectors", {"from_capture": {"capture_id": CAP, "hook_id": "blocks.1.hook_resid_post", "reduce": "mean"}}),
    ("POST", "/v1/vectors", {"from_capture": {"capture_id": CAP, "hook_id": "h", "reduce": "last", "positions": "prompt"},
                             "name": "w"}),
    ("GET", "/v1/vectors", None),
    ("GET", f"/v1/vectors/{VEC}", None),
    ("POST", "/v1/vectors/vec_00000000000000ff/delete", {}),
    ("POST", f"/v1/activations/{CAP}/release", {}),
    ("GET", "/v1/activations/points", None),  # the heads sweep: no head_output point, so it stops
    ("GET", "/v1/activations/points", None),  # the resid_pre sweep over 2 layers: the clean run, no capture
    ("POST", ACT, {"activations_encoding": "base64", "messages": _user("John gave Mary"), "max_tokens": 1, "temperature": 0,
                   "activations_transport": "shm", "logprob_token_ids": [11, 12],
                   "activation_hooks": [{"layer_name": f"blocks.{i}.hook_resid_pre", "hook_id": f"blocks.{i}.hook_resid_pre"}
                                        for i in range(2)]}),
    # raw prompts: `prompt` (text or token ids) instead of `messages`
    ("POST", CHAT, {"prompt": "When Mary and John", "max_tokens": 2, "temperature": 0}),
    ("POST", CHAT, {"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0,
                    "interventions": [{"layer_name": "blocks.0.hook_resid_post", "op": "zero"}]}),
    ("POST", ACT, {"activations_encoding": "base64", "prompt": "Hi", "max_tokens": 2, "temperature": 0, "activations_transport": "shm",
                   "activation_hooks": [{"layer_name": "blocks.1.hook_resid_post", "hook_id": "blocks.1.hook_resid_post"}]}),
    ("POST", CHAT, {"prompt": "When Mary and John", "max_tokens": 1, "temperature": 0, "logprob_token_ids": [11, 12],
                    "interventions": [{"layer_name": "blocks.0.hook_resid_post", "op": "zero"}]}),
    ("GET", "/v1/activations/points", None),
    ("POST", ACT, {"activations_encoding": "base64", "prompt": "John gave Mary", "max_tokens": 1, "temperature": 0,
                   "activations_transport": "shm", "logprob_token_ids": [11, 12],
                   "activation_hooks": [{"layer_name": f"blocks.{i}.hook_resid_pre", "hook_id": f"blocks.{i}.hook_resid_pre"}
                                        for i in range(2)]}),
]


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with a chat completion without logprobs, and records it."""

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        self.server.seen.append((self.command, self.path, json.loads(raw) if raw else None))
        body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_builders_and_requests(recorder):
    env = {"NSB_PY_INTERVENTIONS": json.dumps(CONTRACT_INTERVENTIONS, sort_keys=True, separators=(",", ":")),
           "NSB_ECHO": "http://127.0.0.1:%d" % recorder.server_address[1]}
    r = st.run_st([CHECKED_IN, ST_TESTS / "interventions_unit.st"], env=env, timeout=120)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    assert "ok - builders equal the contract's JSON" in r.stdout
    assert "WARNING" not in r.stderr, r.describe()
    assert r.passed >= 83, r.describe()
    assert recorder.seen == EXPECTED_REQUESTS


# --- against the tiny model's server -------------------------------------------------------------
def _post(server, path, body):
    r = requests.post(server.base_url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _target_logprobs(response):
    return {t["token_id"]: t["logprob"] for t in response["choices"][0]["logprobs"]["content"][0]["target_logprobs"]}


def _input(text, raw):
    """The request's input: the chat (one user message) or, raw, the prompt without the template."""
    return {"prompt": text} if raw else {"messages": _user(text)}


def _logit_difference(server, text, target, foil, interventions=None, raw=False):
    body = {**_input(text, raw), "max_tokens": 1, "temperature": 0, "logprob_token_ids": [target, foil]}
    if interventions:
        body["interventions"] = interventions
    lp = _target_logprobs(_post(server, CHAT, body))
    return lp[target] - lp[foil]


def _pick_target_and_foil(server, raw=False):
    """The two tokens whose logprob moves most between the clean and the corrupted prompt, so the
    sweep's normalisation divides by a clear difference."""
    ids = list(range(256, 320))
    logprobs = []
    for text in (CLEAN, CORRUPTED):
        logprobs.append(_target_logprobs(_post(server, CHAT, {**_input(text, raw), "max_tokens": 1, "temperature": 0,
                                                              "logprob_token_ids": ids})))
    shift = {i: logprobs[0][i] - logprobs[1][i] for i in ids}
    return max(ids, key=shift.get), min(ids, key=shift.get)


def _python_sweep(server, target, foil, sites, heads=None, raw=False):
    """The contract's recipe, with requests: clean capture kept in shared memory, patched runs, release."""
    clean = _post(server, ACT, {**_input(CLEAN, raw), "max_tokens": 1, "temperature": 0,
                                "activations_transport": "shm", "logprob_token_ids": [target, foil],
                                "activation_hooks": [{"layer_name": s, "hook_id": s} for s in sites]})
    capture = clean["capture"]["capture_id"]
    try:
        effects = []
        for site in sites:
            patch = {"layer_name": site, "op": "patch", "source": {"capture_id": capture, "hook_id": site},
                     "positions": "prompt"}
            if heads is None:
                effects.append(_logit_difference(server, CORRUPTED, target, foil, [patch], raw=raw))
            else:
                effects.append([_logit_difference(server, CORRUPTED, target, foil, [{**patch, "heads": [h]}], raw=raw)
                                for h in range(heads)])
    finally:
        requests.post(f"{server.base_url}/v1/activations/{capture}/release", timeout=30)
    lp = _target_logprobs(clean)
    return lp[target] - lp[foil], _logit_difference(server, CORRUPTED, target, foil, raw=raw), effects


def _live_captures(server):
    status = requests.get(server.base_url + "/v1/activations", timeout=30).json()
    return {s["capture_id"] for s in status["segments"] if s["state"] == "live"}


@pytest.fixture(scope="module")
def live_run(tiny_server, tmp_path_factory):
    target, foil = _pick_target_and_foil(tiny_server)
    raw_target, raw_foil = _pick_target_and_foil(tiny_server, raw=True)
    out = tmp_path_factory.mktemp("squeak-interventions") / "report.json"
    env = {"NSB_URL": tiny_server.base_url, "NSB_PROMPT": PROMPT, "NSB_CLEAN": CLEAN, "NSB_CORRUPTED": CORRUPTED,
           "NSB_TARGET": str(target), "NSB_FOIL": str(foil), "NSB_RAW_TARGET": str(raw_target),
           "NSB_RAW_FOIL": str(raw_foil), "NSB_OUT": str(out)}
    r = st.run_st([CHECKED_IN, ST_TESTS / "interventions_live.st"], env=env, timeout=300)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    report = json.loads(out.read_text(encoding="utf-8"))
    report["raw_ids_used"] = [raw_target, raw_foil]
    return r, report, target, foil


def test_vm_checks_pass(live_run):
    r, report, _, _ = live_run
    assert r.passed >= 39, r.describe()
    assert report["n_layers"] == 3 and report["n_heads"] == 4 and report["d_model"] == 64


def test_ablations_match_the_server(live_run, tiny_server):
    _, report, _, _ = live_run
    zero = _post(tiny_server, CHAT, {"messages": _user(PROMPT), "max_tokens": 3, "temperature": 0,
                                     "interventions": [{"layer_name": "blocks.0.hook_resid_pre", "op": "zero"}]})
    assert report["zero"]["interventions"] == zero["interventions"]
    assert report["zero"]["choices"][0]["message"] == zero["choices"][0]["message"]
    touched = zero["interventions"][0]["positions_touched"]
    assert touched[0] == zero["usage"]["prompt_tokens"] and len(touched) == zero["usage"]["completion_tokens"]
    heads = _post(tiny_server, CHAT, {"messages": _user(PROMPT), "max_tokens": 2, "temperature": 0, "interventions": [
        {"layer_name": "blocks.1.attn.hook_z", "op": "zero", "heads": [0, 2], "positions": "prompt"}]})
    assert report["heads_ablation"]["interventions"] == heads["interventions"]
    touched = heads["interventions"][0]["positions_touched"]
    assert touched[0] == heads["usage"]["prompt_tokens"] and not any(touched[1:])  # the prompt only
    assert report["heads_ablation"]["choices"][0]["message"] == heads["choices"][0]["message"]


def test_steering_and_baseline_match_the_server(live_run, tiny_server):
    _, report, _, _ = live_run
    values = [((i % 7) - 3) * 0.25 for i in range(1, 65)]  # interventions_live.st's vector
    assert report["vector"]["norm"] == pytest.approx(math.sqrt(sum(v * v for v in values)), rel=1e-6)
    plain = _post(tiny_server, CHAT, {"messages": _user(PROMPT), "max_tokens": 6, "temperature": 0.9, "seed": 7})
    steered = _post(tiny_server, CHAT, {"messages": _user(PROMPT), "max_tokens": 6, "temperature": 0.9, "seed": 7,
                                        "baseline": True, "interventions": [
                                            {"layer_name": "blocks.1.hook_resid_post", "op": "add", "vector": values,
                                             "coefficient": 16}]})
    text = report["steered"]["choices"][0]["message"]["content"]
    baseline = report["steered"]["baseline"]["choices"][0]["message"]["content"]
    assert baseline == plain["choices"][0]["message"]["content"] == report["plain"]["choices"][0]["message"]["content"]
    assert text == steered["choices"][0]["message"]["content"] != baseline
    assert report["steered"]["interventions"] == steered["interventions"]
    assert report["greedy"]["baseline"]["choices"][0]["message"]["content"] == _post(tiny_server, CHAT, {
        "messages": _user(PROMPT), "max_tokens": 6, "temperature": 0})["choices"][0]["message"]["content"]


def test_vectors_and_captures_are_cleaned_up(live_run, tiny_server):
    _, report, _, _ = live_run
    stored = {v["vector_id"] for v in requests.get(tiny_server.base_url + "/v1/vectors", timeout=30).json()["data"]}
    assert report["vector"]["vector_id"] not in stored and report["from_capture"]["vector_id"] not in stored
    assert report["from_capture"]["source"]["capture_id"] == report["kept_capture"]
    live = _live_captures(tiny_server)
    assert not {report["kept_capture"], report["sweep"]["capture_id"], report["heads_sweep"]["capture_id"],
                report["raw_sweep"]["capture_id"]} & live


def test_logit_difference_matches_the_server(live_run, tiny_server):
    _, report, target, foil = live_run
    assert report["logit_difference"] == pytest.approx(_logit_difference(tiny_server, CLEAN, target, foil), abs=1e-5)
    assert report["logit_difference"] == report["logprobs"][0] - report["logprobs"][1]
    ablated = _logit_difference(tiny_server, CLEAN, target, foil,
                                [{"layer_name": "blocks.2.hook_resid_pre", "op": "zero", "positions": "prompt"}])
    assert report["logit_difference_zero"] == pytest.approx(ablated, abs=1e-5)


def test_resid_pre_sweep_matches_the_recipe(live_run, tiny_server):
    _, report, target, foil = live_run
    sweep = report["sweep"]
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    assert sweep["hooks"] == sites and sweep["layers"] == [0, 1, 2] and sweep["site"] == "resid_pre"
    clean, corrupted, effects = _python_sweep(tiny_server, target, foil, sites)
    assert sweep["clean"] == pytest.approx(clean, abs=1e-5) and sweep["corrupted"] == pytest.approx(corrupted, abs=1e-5)
    assert sweep["effects"] == pytest.approx(effects, abs=1e-5)
    assert abs(clean - corrupted) > 0.05
    assert sweep["normalized"][0] == pytest.approx(1.0, abs=1e-4)  # the whole prompt, before layer 0: the clean run
    assert sweep["normalized"] == pytest.approx([(e - corrupted) / (clean - corrupted) for e in effects], abs=1e-4)


def test_heads_sweep_matches_the_recipe(live_run, tiny_server):
    _, report, target, foil = live_run
    sweep = report["heads_sweep"]
    assert sweep["heads"] == 4 and len(sweep["effects"]) == 3 and all(len(row) == 4 for row in sweep["effects"])
    assert len(sweep["normalized"]) == 3 and all(len(row) == 4 for row in sweep["normalized"])
    sites = [f"blocks.{i}.attn.hook_z" for i in range(3)]
    clean, corrupted, effects = _python_sweep(tiny_server, target, foil, sites, heads=4)
    assert [row for row in sweep["effects"]] == [pytest.approx(row, abs=1e-5) for row in effects]


def test_raw_prompt_logit_difference_matches_python(live_run, tiny_server):
    _, report, _, _ = live_run
    target, foil = report["raw_ids_used"]
    direct = _logit_difference(tiny_server, CLEAN, target, foil, raw=True)  # POST with "prompt"
    with LMStudioNeuroScopeClient(tiny_server.base_url) as client:
        bridge = client.logit_difference(CLEAN, target, foil)  # the Python bridge: a str is the raw prompt
        by_ids = client.logit_difference(report["raw_ids"], target, foil)
        complete = client.chat(prompt=CLEAN, max_tokens=3, temperature=0)
    assert report["raw_logit_difference"] == pytest.approx(bridge, abs=1e-5) and bridge == direct == by_ids
    assert report["raw_logit_difference"] != pytest.approx(_logit_difference(tiny_server, CLEAN, target, foil), abs=1e-5)
    assert report["complete"]["choices"][0]["message"] == complete["choices"][0]["message"]
    assert report["complete"]["usage"] == complete["usage"]
    ablated = _logit_difference(tiny_server, CLEAN, target, foil,
                                [{"layer_name": "blocks.2.hook_resid_pre", "op": "zero", "positions": "prompt"}], raw=True)
    assert report["raw_logit_difference_zero"] == pytest.approx(ablated, abs=1e-5)


def test_raw_prompt_sweep_matches_python(live_run, tiny_server):
    _, report, _, _ = live_run
    target, foil = report["raw_ids_used"]
    sweep = report["raw_sweep"]
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    assert sweep["hooks"] == sites and sweep["layers"] == [0, 1, 2] and sweep["site"] == "resid_pre"
    assert sweep["normalized"][0] == pytest.approx(1.0, abs=1e-4)  # the whole raw prompt, before layer 0
    clean, corrupted, effects = _python_sweep(tiny_server, target, foil, sites, raw=True)
    with LMStudioNeuroScopeClient(tiny_server.base_url) as client:
        bridge = client.patching_sweep(CLEAN, CORRUPTED, target, foil, site="resid_pre")
    assert (bridge.clean, bridge.corrupted) == (clean, corrupted) and list(bridge.effects) == pytest.approx(effects)
    assert sweep["clean"] == pytest.approx(clean, abs=1e-5) and sweep["corrupted"] == pytest.approx(corrupted, abs=1e-5)
    assert sweep["effects"] == pytest.approx(effects, abs=1e-5)
    assert sweep["normalized"] == pytest.approx(list(bridge.normalized), abs=1e-4)
    assert sweep["prompt_tokens"] == len(report["raw_ids"])


def test_errors(live_run):
    _, report, _, _ = live_run
    assert "same length" in report["length_error"] and "HTTP" not in report["length_error"]
    assert report["refused"]["type"] == "invalid_request_error"
    assert report["refused"]["param"].startswith("interventions[0]")
