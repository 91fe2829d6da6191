"""The Smalltalk client's binary activations (activations_encoding base64), in a real Squeak VM.

- Without a server: smalltalk/tests/binary_unit.st decodes base64 float32, float16 and bfloat16
  (NSBinary: BitBlt bulk copies, and the Smalltalk loop it falls back to) and the bytes it gets
  are compared here, bit for bit, with numpy's; a synthetic response converts to the same
  NeuroScope tensors from JSON and from base64; malformed or truncated base64 and a length that
  does not fit the shape are errors that say so.
- Against the tiny model's server (quick) and the default model's (slow, a payload of at least
  25 MB): smalltalk/tests/binary_live.st makes a greedy request with binary activations and
  writes the float32 bits it decoded; Python makes the same request with bridge.client and
  checks every value bit for bit, for float32 and float16 captures, and the NeuroScope
  conversion against the Python bridge's.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from bridge.smalltalk import CHECKED_IN
from tests.smalltalk_support import ROOT, load_harness

ST_TESTS = ROOT / "smalltalk" / "tests"
st = load_harness()
_REASON = st.unavailable_reason()
pytestmark = [pytest.mark.squeak, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _cases(rng) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """name -> (dtype, the little-endian values, their float32 widening)"""
    specials32 = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -2.5],
                          dtype="<f4")
    specials16 = np.array([0.0, -0.0, np.inf, -np.inf, 6e-8, -6e-8, 6.1e-5, 65504, -1.5, 1e-5], dtype="<f2")
    out = {}
    for n in (1, 2, 3, 4, 5, 12, 13, 1001):  # every padding, odd counts, rows of 4 groups and less
        a = rng.standard_normal(n).astype("<f4")
        out[f"f32_{n}"] = ("float32", a, a)
        h = rng.standard_normal(n).astype("<f2")
        out[f"f16_{n}"] = ("float16", h, h.astype("<f4"))
        bits = (rng.standard_normal(n).astype("<f4").view("<u4") >> 16).astype("<u2")
        out[f"bf16_{n}"] = ("bfloat16", bits, (bits.astype("<u4") << 16).view("<f4"))
    big = np.concatenate([specials32, rng.standard_normal(200_000).astype("<f4")])
    out["f32_special"] = ("float32", big, big)
    allh = np.arange(65536, dtype="<u2").view("<f2")  # every float16, NaNs included
    out["f16_all"] = ("float16", allh, allh.astype("<f4"))
    sp = np.concatenate([specials16, rng.standard_normal(999).astype("<f2")])
    out["f16_special"] = ("float16", sp, sp.astype("<f4"))
    return out


def _entry(hook, comp, layer, step, start, data: np.ndarray, encoding):
    n = data.shape[0 if comp in ("residual", "mlp") else 1]
    e = {"hook_id": hook, "layer_name": f"model.layers.{layer}", "layer_index": layer, "component": comp,
         "shape": list(data.shape), "dtype": "float32", "is_input": False, "step": step,
         "positions": [start, start + n], "module_path": f"model.layers.{layer}"}
    if encoding == "base64":
        e["data_base64"] = _b64(data.astype("<f4"))
        e["encoding"] = "base64"
    else:
        lists = data.astype(np.float32).tolist()
        if comp == "attention_scores":
            lists = json.loads(json.dumps(lists).replace("-Infinity", "null"))
        e["data"] = lists
    return e


def _synthetic_response(rng, encoding):
    """A prompt of 3 tokens and 2 decode steps: residual, mlp, query, pattern and scores."""
    heads, d, dh = 3, 5, 4
    tokens = ["a", "b", "c", "d", "e"]
    acts = {}
    for comp, layer in (("residual", 0), ("mlp", 1), ("query", 0), ("attention_pattern", 1), ("attention_scores", 1)):
        hook = f"transformer.h.{layer}.{comp}"
        entries = []
        for step, (start, n) in enumerate(((0, 3), (3, 1), (4, 1))):
            if comp in ("residual", "mlp"):
                data = rng.standard_normal((n, d))
            elif comp == "query":
                data = rng.standard_normal((heads, n, dh))
            else:
                data = rng.random((heads, n, start + n))
                if comp == "attention_scores" and step == 0:
                    data[:, 0, 1:] = -np.inf  # the causal mask inside the prompt
            entries.append(_entry(hook, comp, layer, step, start, data.astype(np.float32), encoding))
        acts[hook] = entries
    return {"object": "chat.completion", "tokens": tokens, "activations": acts}


@pytest.fixture(scope="module")
def unit_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("st-binary")
    rng = np.random.default_rng(7)
    cases = _cases(rng)
    for name, (dtype, raw, _) in cases.items():
        (d / f"{name}.b64").write_text(_b64(raw), encoding="ascii")
    for encoding in ("json", "base64"):
        resp = _synthetic_response(np.random.default_rng(11), encoding)
        (d / f"response_{encoding}.json").write_text(json.dumps(resp), encoding="utf-8")
    env = {"NSB_DIR": str(d), "NSB_CASES": " ".join(f"{n}:{dt}:{raw.size}" for n, (dt, raw, _) in cases.items())}
    r = st.run_st([CHECKED_IN, ST_TESTS / "binary_unit.st"], env=env, timeout=300)
    return r, d, cases


def test_vm_checks_pass(unit_run):
    r, _, _ = unit_run
    assert r.returncode == 0 and r.failed == 0, r.describe()
    assert r.passed >= 60, r.describe()


@pytest.mark.parametrize("path", ["bulk", "loop"])
def test_decoded_bits_equal_numpy(unit_run, path):
    r, d, cases = unit_run
    assert r.returncode == 0, r.describe()
    for name, (dtype, _, want) in cases.items():
        got = np.frombuffer((d / f"{name}.{path}").read_bytes(), "<u4")
        assert got.size == want.size, name
        bad = np.nonzero(got != want.view("<u4"))[0]
        assert bad.size == 0, f"{name} ({path}): {bad.size} values differ, first at {bad[:5]}: " \
                              f"{got[bad[:5]]} vs {want.view('<u4')[bad[:5]]}"


def test_conversion_from_base64_equals_the_python_bridge(unit_run):
    from bridge.neuroscope import to_neuroscope

    r, d, _ = unit_run
    assert r.returncode == 0, r.describe()
    resp = _synthetic_response(np.random.default_rng(11), "base64")
    want = to_neuroscope(resp)["layers"]
    report = json.loads((d / "report.json").read_text(encoding="utf-8"))
    assert len(report) == 5
    for key, shape in report.items():
        layer, comp = key.split("/")
        w = np.asarray(want[layer][comp]["data"], dtype=np.float32)
        got = np.frombuffer((d / f"conv_{layer}_{comp}.bin").read_bytes(), "<f4").reshape(shape)
        assert list(w.shape) == shape, key
        assert np.array_equal(got.view("<u4"), w.view("<u4")), key


# --- against a live server ------------------------------------------------------------------------
SHORT_PROMPT = "Name three colours."
LONG_PROMPT = ("Explain, step by step and in plain words, how a transformer language model turns a prompt into "
               "its next token: the embedding of each token, the residual stream that every layer reads and "
               "writes, attention heads that move information between positions, the MLP blocks that act on "
               "each position alone, the final norm and the unembedding, and how greedy decoding then picks "
               "one token after another until it stops.")


def run_live(base_url, out_dir, *, prompt, max_tokens, layers, encoding="base64", dtype=None, convert=True,
             dump=True, repeat=1, timeout=600):
    """binary_live.st against base_url: (StResult, report dict, values.bin bytes or None)."""
    env = {"NSB_URL": base_url, "NSB_PROMPT": prompt, "NSB_MAX_TOKENS": str(max_tokens), "NSB_LAYERS": str(layers),
           "NSB_ENCODING": encoding, "NSB_DTYPE": dtype or "", "NSB_CONVERT": "1" if convert else "0",
           "NSB_DUMP": "1" if dump else "0", "NSB_DIR": str(out_dir), "NSB_REPEAT": str(repeat)}
    r = st.run_st([CHECKED_IN, ST_TESTS / "binary_live.st"], env=env, timeout=timeout)
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8")) if r.returncode == 0 else None
    values = (out_dir / "values.bin").read_bytes() if r.returncode == 0 and dump else None
    return r, report, values


def check_against_python(base_url, report, values, *, prompt, max_tokens, dtype):
    """The same greedy request through bridge.client: every value bit for bit, and the NeuroScope
    conversion against the Python bridge's. Answers the base64 payload size (characters)."""
    from bridge.client import LMStudioNeuroScopeClient, entry_array
    from bridge.neuroscope import to_neuroscope

    with LMStudioNeuroScopeClient(base_url) as client:
        result = client.generate_with_activations(prompt, report["hooks"], max_tokens=max_tokens, temperature=0,
                                                  encoding="base64", dtype=dtype)
    assert result.tokens == report["tokens"] and result.token_ids == report["token_ids"]
    assert result.text == report["text"]
    got_all = np.frombuffer(values, "<u4")
    payload = 0
    assert sorted(result.activations) == sorted(report["entries"])
    for hook, entries in result.activations.items():
        index = sorted(report["entries"][hook], key=lambda x: x[0])
        assert len(index) == len(entries), hook
        for e, (step, shape, offset, count) in zip(sorted(entries, key=lambda e: e["step"]), index):
            assert e["dtype"] == (dtype or "float32")
            payload += len(e["data_base64"])
            want = entry_array(e)
            assert list(want.shape) == shape and e["step"] == step and want.size == count, (hook, step)
            got = got_all[offset // 4: offset // 4 + count]
            assert np.array_equal(got, want.reshape(-1).view("<u4")), (hook, step)
    want_layers = to_neuroscope(result)["layers"]
    for key, (shape, offset, count) in report["neuroscope"].items():
        layer, comp = key.split("/")
        w = np.ascontiguousarray(want_layers[layer][comp]["data"], dtype=np.float32)
        assert list(w.shape) == shape, key
        assert np.array_equal(got_all[offset // 4: offset // 4 + count], w.reshape(-1).view("<u4")), key
    return payload


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_tiny_model_bits_equal_the_python_client(tiny_server, tmp_path, dtype):
    r, report, values = run_live(tiny_server.base_url, tmp_path, prompt=SHORT_PROMPT, max_tokens=3, layers=2,
                                 dtype=dtype)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    assert report["bulk"] is True
    check_against_python(tiny_server.base_url, report, values, prompt=SHORT_PROMPT, max_tokens=3, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_default_model_big_payload_bits_equal_the_python_client(live_server, tmp_path, dtype):
    """Every layer (residual, attention, mlp), a long prompt: at least 25 MB of base64 for float32."""
    r, report, values = run_live(live_server.base_url, tmp_path, prompt=LONG_PROMPT, max_tokens=4, layers=30,
                                 dtype=dtype)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    payload = check_against_python(live_server.base_url, report, values, prompt=LONG_PROMPT, max_tokens=4,
                                   dtype=dtype)
    assert payload >= (25_000_000 if dtype is None else 12_500_000), payload


def test_vectors_go_up_as_base64_and_come_back(tiny_server, tmp_path):
    points = requests_json(tiny_server.base_url + "/v1/activations/points")["points"]
    d_model = next(p["shape_per_token"][0] for p in points if p["component"] == "embedding")
    vec = np.random.default_rng(3).standard_normal(d_model).astype("<f4")
    vec[0], vec[1] = -0.0, np.float32(1e-45)  # the bits must survive: -0.0 and a subnormal
    small = np.array([0.1, -0.0, 1e-45, -2.5], dtype="<f4")
    env = {"NSB_URL": tiny_server.base_url, "NSB_DIR": str(tmp_path), "NSB_VECTOR": _b64(vec),
           "NSB_COUNT": str(d_model), "NSB_SMALL": _b64(small)}
    r = st.run_st([CHECKED_IN, ST_TESTS / "binary_vectors.st"], env=env, timeout=120)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    desc = json.loads((tmp_path / "vector.json").read_text(encoding="utf-8"))
    assert desc["shape"] == [d_model] and desc["name"] == "st-binary"
    assert math.isclose(desc["norm"], float(np.linalg.norm(vec.astype(np.float64))), rel_tol=1e-5)


def requests_json(url):
    import requests

    r = requests.get(url, timeout=30)
    r.raise_for_status()
    return r.json()
