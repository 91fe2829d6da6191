"""The Smalltalk client's logit lens in a real Squeak VM, against the tiny model's live server:
smalltalk/tests/lens_live.st keeps a capture of every layer's residual output, asks for its lens
(every layer and position; some layers and positions in a given order) and two bad requests; Python
then asks the server the same questions and compares, token for token and bit for bit."""

from __future__ import annotations

import json

import pytest
import requests

from bridge.smalltalk import CHECKED_IN
from tests.smalltalk_support import ROOT, load_harness, strict_json_equal

ST_TESTS = ROOT / "smalltalk" / "tests"
PROMPT = "The quick brown fox jumps over"

st = load_harness()
_REASON = st.unavailable_reason()
pytestmark = [pytest.mark.squeak, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def live_run(tiny_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("squeak-lens") / "report.json"
    env = {"NSB_URL": tiny_server.base_url, "NSB_PROMPT": PROMPT, "NSB_OUT": str(out)}
    r = st.run_st([CHECKED_IN, ST_TESTS / "lens_live.st"], env=env, timeout=300)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    report = json.loads(out.read_text(encoding="utf-8"))
    yield r, report
    requests.delete(f"{tiny_server.base_url}/v1/activations/{report['capture_id']}", timeout=30)


def _lens(server, capture_id, body):
    r = requests.post(f"{server.base_url}/v1/activations/{capture_id}/logit_lens", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _by_layer_and_position(lens):
    """The server's answer as the Smalltalk client answers it, keys as JSON writes them."""
    out = {}
    for i, layer in enumerate(lens["layers"]):
        out[str(layer)] = {str(p): [{"token_id": t, "token": lens["strings"][str(t)], "prob": q}
                                    for t, q in zip(lens["token_ids"][i][j], lens["probs"][i][j])]
                           for j, p in enumerate(lens["positions"])}
    return out


def test_vm_checks_pass(live_run):
    r, _ = live_run
    assert r.passed >= 11, r.describe()


def test_lens_matches_the_server(live_run, tiny_server):
    _, report = live_run
    cid = report["capture_id"]
    whole = _lens(tiny_server, cid, {"top_k": 3})
    strict_json_equal(report["all_response"], whole)
    strict_json_equal(report["all"], _by_layer_and_position(whole))
    assert len(report["all"]) == 3 and len(report["all"]["0"]) == len(report["token_ids"])
    n = len(whole["layers"])
    some = _lens(tiny_server, cid, {"top_k": 2, "layers": [n - 1, 0], "positions": [3, 1]})
    strict_json_equal(report["some"], _by_layer_and_position(some))


def test_error_names_the_field(live_run):
    _, report = live_run
    assert report["layer_error"]["param"] == "layers" and "[0, 1, 2]" in report["layer_error"]["message"]
