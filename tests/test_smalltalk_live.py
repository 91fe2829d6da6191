"""The generated Smalltalk client in a real Squeak VM against a live server with the default model.

One VM run (smalltalk/tests/live_client.st) checks health, loadModel:, hook points, a greedy
generation with activation hooks, NeuroScope's format, registered hooks and server errors; it
writes what it saw as JSON. Python then makes the same greedy request with `requests` and
checks that Squeak read every token, shape and value exactly (float bits included), and that
its NeuroScope conversion equals the Python bridge's.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
import requests

from bridge.smalltalk import (
    CHECKED_IN,
    DEFAULT_COMPONENTS,
    DEFAULT_N_LAYERS,
    _PointsClient,
    facts_from_client,
    generate_neuroscope_smalltalk_interface,
)
from tests.smalltalk_support import load_harness, strict_json_equal

ROOT = Path(__file__).resolve().parent.parent
ST_TESTS = ROOT / "smalltalk" / "tests"
PROMPT = "Hi"
MAX_TOKENS = 3
HOOKS = [
    {"layer_name": "transformer.h.2", "component": "residual", "capture_input": False, "capture_output": True},
    {"layer_name": "model.layers.1", "component": "attention_pattern", "capture_input": False, "capture_output": True},
]


st = load_harness()
_REASON = st.unavailable_reason()
pytestmark = pytest.mark.slow


def needs_squeak(test):
    return pytest.mark.squeak(pytest.mark.skipif(_REASON is not None, reason=_REASON or "")(test))


def _flat(x):
    if isinstance(x, list):
        for v in x:
            yield from _flat(v)
    else:
        yield x


def _at(data, indices):
    for i in indices:
        data = data[i - 1]
    return data


@pytest.fixture(scope="module")
def squeak_run(live_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("squeak-live") / "report.json"
    env = {"NSB_URL": live_server.base_url, "NSB_MODEL_PATH": str(live_server.model_path), "NSB_PROMPT": PROMPT,
           "NSB_MAX_TOKENS": str(MAX_TOKENS), "NSB_OUT": str(out)}
    started = time.monotonic()
    r = st.run_st([CHECKED_IN, ST_TESTS / "live_client.st"], env=env, timeout=300)
    elapsed = time.monotonic() - started
    assert r.returncode == 0 and r.failed == 0, r.describe()
    report = json.loads(out.read_text(encoding="utf-8"))
    # the Python client's view of the same greedy request, after the VM run (same model state)
    py = requests.post(live_server.base_url + "/v1/chat/completions/with_activations", timeout=120, json={
        "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS, "temperature": 0,
        "activation_hooks": HOOKS}).json()
    return r, report, py, elapsed


@needs_squeak
def test_vm_checks_pass(squeak_run):
    r, report, py, elapsed = squeak_run
    assert r.passed >= 25, r.describe()
    assert report["health"]["status"] == "ok"
    assert report["load"]["status"] == "loaded" and report["load"]["supports_activations"] is True
    assert report["restore"]["model_id"] == report["health"]["model_id"]
    assert report["points_n_layers"] == report["load"]["n_layers"] == 30


@needs_squeak
def test_generation_matches_python_exactly(squeak_run):
    _, report, py, _ = squeak_run
    sq = report["response"]
    assert sq["tokens"] == py["tokens"] and sq["token_ids"] == py["token_ids"]
    assert sq["choices"][0]["message"] == py["choices"][0]["message"]
    assert report["text"] == py["choices"][0]["message"]["content"]
    assert sq["usage"] == py["usage"]
    assert sorted(sq["activations"]) == sorted(py["activations"]) == ["model.layers.1.attention_pattern",
                                                                      "transformer.h.2.residual"]
    # every entry: metadata, shape and each value (as read by Squeak, written back, read by Python)
    strict_json_equal(sq["activations"], py["activations"], "activations")


@needs_squeak
def test_activation_objects_match_python(squeak_run):
    _, report, py, _ = squeak_run
    tokens = py["tokens"]
    for hook, entries in py["activations"].items():
        summary = report["summary"][hook]
        assert len(summary) == len(entries) == MAX_TOKENS + 1
        for s, e in zip(summary, entries):
            assert s["shape"] == e["shape"] and s["step"] == e["step"] and s["consistent"] is True
            start, stop = e["positions"]
            assert s["positions"] == list(range(start, stop)) and s["tokens"] == tokens[start:stop]
            assert s["numel"] == math.prod(e["shape"])
            assert s["layer_index"] == (2 if "h.2" in hook else 1)
            total = 0.0
            for v in _flat(e["data"]):
                total += v  # same order and precision as NSActivation>>sum
            assert struct.pack("<d", s["sum"]) == struct.pack("<d", total), (hook, e["step"])
            for indices, value in s["samples"]:
                assert value == _at(e["data"], indices), (hook, e["step"], indices)
    assert report["summary"]["transformer.h.2.residual"][0]["dims"] == ["seq", "d_model"]


@needs_squeak
def test_neuroscope_format_matches_the_python_bridge(squeak_run):
    from bridge.neuroscope import to_jsonable, to_neuroscope

    _, report, py, _ = squeak_run
    want = to_jsonable(to_neuroscope(py), "list")["layers"]
    got = report["neuroscope"]
    assert sorted(got) == sorted(want) == ["transformer.h.1", "transformer.h.2"]
    strict_json_equal(got, want, "layers")
    pattern = got["transformer.h.1"]["attention_pattern"]
    n = len(py["tokens"])
    assert pattern["shape"] == [9, n, n] and pattern["key_tokens"] == py["tokens"]


@needs_squeak
def test_server_errors_are_smalltalk_errors(squeak_run):
    _, report, _, elapsed = squeak_run
    err = report["error"]
    assert err["status"] == 400 and err["last_error"]["code"] == "unknown_hook"
    assert "unknown layer 'transformer.h.99'" in err["message"] and "HTTP 400" in err["message"]
    assert err["elapsed_ms"] < 10000  # answered, not hung
    assert "no activation hooks" in report["no_hooks_error"]
    assert report["registered_keys"] == ["transformer.h.0.mlp"]
    assert elapsed < 240


def test_generator_with_a_live_client(live_server):
    """The generator reads the live server's facts, and the checked-in defaults (30 layers, the
    components) are the default model's real facts."""
    try:
        from bridge.client import LMStudioNeuroScopeClient

        client = LMStudioNeuroScopeClient(live_server.base_url)
        client.hook_points  # noqa: B018  (the attribute the generator needs)
    except (ImportError, AttributeError):
        client = _PointsClient(live_server.base_url)
    facts = facts_from_client(client)
    assert facts["base_url"].rstrip("/") == live_server.base_url
    assert facts["n_layers"] == DEFAULT_N_LAYERS
    assert facts["components"] == list(DEFAULT_COMPONENTS)
    src = generate_neuroscope_smalltalk_interface(client)
    assert src == generate_neuroscope_smalltalk_interface(base_url=live_server.base_url, model_id=facts["model_id"])
    assert f"^ '{facts['model_id']}'!" in src and f"^ '{live_server.base_url}'!" in src
