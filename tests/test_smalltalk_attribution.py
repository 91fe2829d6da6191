"""The Smalltalk client's attribution methods in a real Squeak VM, against the tiny model's live server:
smalltalk/tests/attribution_live.st asks for attributions with raw prompts (the token-id logit-difference
convenience), with chats (a logprob metric, named sites, atp*, verify_top), and two bad requests; Python then
asks the server the same questions and compares, number for number."""

from __future__ import annotations

import json

import pytest
import requests

from bridge.smalltalk import CHECKED_IN
from tests.smalltalk_support import ROOT, load_harness

ST_TESTS = ROOT / "smalltalk" / "tests"
CLEAN = "John gave Mary the book because she"
CORRUPTED = "Mary gave John the book because she"  # the same token count: the names swapped
TARGET, FOIL = 5, 9

st = load_harness()
_REASON = st.unavailable_reason()
pytestmark = [pytest.mark.squeak, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _post(server, body):
    r = requests.post(server.base_url + "/v1/attribution", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _same(got, want):
    """JSON answers equal, floats to 1e-12 relative (they went through the Smalltalk JSON reader and writer)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300)
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for k in want:
            _same(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for x, y in zip(got, want):
            _same(x, y)
    else:
        assert got == want


@pytest.fixture(scope="module")
def live_run(tiny_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("squeak-attribution") / "report.json"
    env = {"NSB_URL": tiny_server.base_url, "NSB_CLEAN": CLEAN, "NSB_CORRUPTED": CORRUPTED,
           "NSB_TARGET": str(TARGET), "NSB_FOIL": str(FOIL), "NSB_OUT": str(out)}
    r = st.run_st([CHECKED_IN, ST_TESTS / "attribution_live.st"], env=env, timeout=300)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    return r, json.loads(out.read_text(encoding="utf-8"))


def test_vm_checks_pass(live_run):
    r, _ = live_run
    assert r.passed >= 14, r.describe()


def test_raw_prompts_match_the_server(live_run, tiny_server):
    _, report = live_run
    want = _post(tiny_server, {"clean": {"prompt": CLEAN}, "corrupted": {"prompt": CORRUPTED},
                               "metric": {"type": "logit_diff", "token_ids": [TARGET, FOIL]}})
    _same(report["raw"], want)
    rows = [r for r in want["attributions"] if r["layer_name"] == "blocks.2.hook_resid_post"]
    _same(report["raw_estimates"], [r["estimate"] for r in rows])
    _same(report["raw_top"], sorted(want["attributions"], key=lambda r: -abs(r["estimate"]))[:3])


def test_chats_atp_star_match_the_server(live_run, tiny_server):
    _, report = live_run
    chat = lambda text: {"messages": [{"role": "user", "content": text}]}  # noqa: E731
    want = _post(tiny_server, {"clean": chat(CLEAN), "corrupted": chat(CORRUPTED),
                               "metric": {"type": "logprob", "token_id": TARGET},
                               "sites": [{"layer_name": x} for x in ("blocks.1.attn.hook_z", "blocks.2.attn.hook_q",
                                                                     "blocks.0.hook_mlp_out")],
                               "method": "atp*", "verify_top": 3})
    _same(report["chat"], want)
    n = want["n_tokens"]
    heads = [[r["estimate"] for r in want["attributions"] if r["layer_name"] == "blocks.1.attn.hook_z"
              and r["position"] == p] for p in range(n)]
    _same(report["chat_heads"], heads)
    keywords = _post(tiny_server, {"clean": {"prompt": CLEAN}, "corrupted": {"prompt": CORRUPTED},
                                   "metric": {"type": "logit_diff", "token_ids": [TARGET, FOIL]},
                                   "sites": [{"layer_name": "blocks.2.hook_attn_out"}], "method": "atp",
                                   "verify_top": 1})
    _same(report["keywords"], keywords)


def test_errors_name_the_field(live_run):
    _, report = live_run
    assert report["length_error"]["param"] == "corrupted" and "tokens" in report["length_error"]["message"]
    assert report["site_error"]["param"] == "sites[0].layer_name"
