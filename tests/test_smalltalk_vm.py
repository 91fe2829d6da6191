"""The generated Smalltalk client in a real Squeak VM, without the model server.

The source files in cleanly (no syntax errors, no undeclared variables), its JSON reader and
writer round-trip numbers and strings exactly as Python's json reads them, and HTTP failures
(refused, silent, error status, early close, ...) surface as Smalltalk errors, never hangs.
Skipped, with the reason, where squeak-vm or the Scratch image is missing (`make setup`).
"""

from __future__ import annotations

import json
import math
import random
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bridge.smalltalk import CHECKED_IN, DEFAULT_COMPONENTS, generate_neuroscope_smalltalk_interface
from tests.smalltalk_support import load_harness, strict_json_equal

ROOT = Path(__file__).resolve().parent.parent
ST_TESTS = ROOT / "smalltalk" / "tests"


st = load_harness()
_REASON = st.unavailable_reason()
pytestmark = [pytest.mark.squeak, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def run_ok(files, **kw):
    r = st.run_st(files, **kw)
    assert r.returncode == 0 and r.failed == 0, r.describe()
    return r


# --- the harness itself ---------------------------------------------------------------------
def test_harness_reports_exit_codes(tmp_path):
    ok = tmp_path / "ok.st"
    ok.write_text("StRunner assert: 3 + 4 = 7 named: 'arithmetic'!\nStRunner finish!\n")
    r = st.run_st([ok])
    assert (r.returncode, r.passed, r.failed) == (0, 1, 0), r.describe()

    failing = tmp_path / "fail.st"
    failing.write_text("StRunner assert: 3 + 4 = 8 named: 'wrong'!\nStRunner finish!\n")
    r = st.run_st([failing])
    assert (r.returncode, r.failed, r.failures) == (1, 1, ["not ok - wrong"]), r.describe()

    syntax = tmp_path / "syntax.st"
    syntax.write_text("Object subclass: #Broken instanceVariableNames: '' classVariableNames: '' "
                      "poolDictionaries: '' category: 'T'!\n!Broken methodsFor: 'x'!\nfoo\n\t^ (1 + !\n! !\n")
    r = st.run_st([syntax])
    assert r.returncode == 3 and "SYNTAX ERROR" in r.stderr, r.describe()

    undeclared = tmp_path / "undeclared.st"
    undeclared.write_text("Object subclass: #Sloppy instanceVariableNames: '' classVariableNames: '' "
                          "poolDictionaries: '' category: 'T'!\n"
                          "!Sloppy methodsFor: 'x'!\nfoo\n\t^ NoSuchGlobal new! !\n")
    r = st.run_st([undeclared])
    assert r.returncode == 3 and "NoSuchGlobal" in r.stderr, r.describe()

    runtime = tmp_path / "runtime.st"
    runtime.write_text("nil foo!\n")
    r = st.run_st([runtime])
    assert r.returncode == 2 and "foo" in r.stderr, r.describe()

    r = st.run_st([tmp_path / "missing.st"])
    assert r.returncode == 4, r.describe()


def test_harness_times_out_instead_of_hanging(tmp_path):
    loop = tmp_path / "loop.st"
    loop.write_text("[true] whileTrue: [nil]!\n")
    started = time.monotonic()
    r = st.run_st([loop], timeout=3)
    assert r.returncode == 124 and time.monotonic() - started < 20, r.describe()


# --- the source compiles and its offline behaviour ------------------------------------------
UNIT_ENV_DEFAULT = {
    "NSB_EXPECT_BASE_URL": "http://127.0.0.1:8080", "NSB_EXPECT_HOST": "127.0.0.1", "NSB_EXPECT_PORT": "8080",
    "NSB_EXPECT_MODEL_ID": "smollm2-135m-instruct", "NSB_EXPECT_N_LAYERS": "30",
    "NSB_EXPECT_COMPONENTS": json.dumps(list(DEFAULT_COMPONENTS), separators=(",", ":")),
}


def _python_bridge_hooks() -> str:
    """The Python bridge's hook specs for the calls client_unit.st makes, as NSJsonWriter writes JSON."""
    from bridge.neuroscope import NeuroScopeActivationBridge as B

    specs = [
        B.create_hook_specs_for_circuit_analysis(3, ("residual", "embedding", "attention_pattern"), capture_input=True),
        B.create_attention_analysis_hooks(30, [0, 14, -1], include_scores=True),
        B.create_attention_analysis_hooks([2, 5]),
    ]
    return json.dumps(specs, sort_keys=True, separators=(",", ":"))


def test_checked_in_source_files_in_cleanly():
    """The checked-in file: no syntax errors, no undeclared variables (strict), every selector;
    hook builders equal to the Python bridge's; the NeuroScope conversion."""
    env = {**UNIT_ENV_DEFAULT, "NSB_PY_HOOKS": _python_bridge_hooks()}
    r = run_ok([CHECKED_IN, ST_TESTS / "client_unit.st"], env=env)
    assert r.passed >= 95, r.describe()
    assert "ok - hooks equal the Python bridge's" in r.stdout
    assert "WARNING" not in r.stderr, r.describe()


def test_generated_source_for_another_server_and_model(tmp_path):
    """Facts given to the generator (including a model id that needs escaping) reach the VM."""
    model_id = "it's-a!model"
    src = tmp_path / "LMStudioRESTClient.st"
    src.write_text(generate_neuroscope_smalltalk_interface(
        base_url="http://10.0.0.7:9123", model_id=model_id, n_layers=3, components=["mlp", "residual", "custom"]))
    env = {
        "NSB_EXPECT_BASE_URL": "http://10.0.0.7:9123", "NSB_EXPECT_HOST": "10.0.0.7", "NSB_EXPECT_PORT": "9123",
        "NSB_EXPECT_MODEL_ID": model_id, "NSB_EXPECT_N_LAYERS": "3",
        "NSB_EXPECT_COMPONENTS": '["residual","mlp","custom"]',
    }
    run_ok([src, ST_TESTS / "client_unit.st"], env=env)


# --- JSON ------------------------------------------------------------------------------------
FLOAT_TEXTS = [
    "1.5e-07", "-3.2E+05", "1E5", "1e-5", "-0.000001", "0.1", "0.2", "0.30000000000000004", "3.25", "-2.565217",
    "0.0", "-0.0", "1.0", "100.0", "123456.789", "1e22", "1e23", "9007199254740993.0", "4.9e-324", "5e-324",
    "2.2250738585072014e-308", "2.2250738585072011e-308", "1.7976931348623157e308", "1e-300", "1e300", "6E2",
    "0.1e1", "12345678901234567890.5", "-1.0e-45", "1.401298464324817e-45", "3.4028234663852886e+38",
    "0.068648815", "7.8348727", "-11.547987", "1.2345678901234567e-12", "8.98846567431158e307",
    "1e-40", "-1.1754942e-38", "1.1754943508222875e-38", "7.006492321624085e-46", "7.006492321624087e-46",
    "3.4028235e38", "3.4028235677973366e38", "3.402823669209385e38", "1.0000000596046448", "1.0000001192092896",
    "0.71138704", "16777217.0", "-16777219.0",
]


def _random_float_texts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):  # float32 values as the server writes them (shortest float32 repr)
        v = np.float32(rng.gauss(0, 1) * 10 ** rng.randint(-8, 8))
        out.append(repr(float(v)) if rng.random() < 0.3 else str(v))
    for _ in range(n):  # doubles across the whole exponent range
        out.append(repr(rng.uniform(-1, 1) * 10 ** rng.randint(-307, 307)))
    for _ in range(n // 4):  # exact-halfway style decimals with many digits
        out.append("%d.%de%d" % (rng.randint(1, 9), rng.randint(0, 10 ** 20), rng.randint(-40, 40)))
    return [t.replace("inf", "1e308") for t in out]


STRINGS = [
    "plain", "quote \" inside", "back\\slash", "slash / and escaped", "\b\f\n\r\t", "\u0001\u001f\u007f",
    "caf\u00e9", "snow \u2603 man", "emoji \U0001F600", "", "x" * 5000, "bang ! in chunk format", "under_score",
    "'single' quotes", "mixed \u00e9\u2603\U0001F600\n\"",
]

BAD = ["[1,", '{"a" 1}', '"abc', "tru", "[1 2]", '{"a":1,}', "[1,]", "-", "1.", "1e", ".5", '{"a":1} x',
       '"\\x"', "", "   ", "[", "{", '"\\u12"', "nul", "+1", "{1: 2}", "[1]]"]


def test_json_round_trip(tmp_path):
    rng = random.Random(20240607)
    floats = FLOAT_TEXTS + _random_float_texts(rng, 150)
    ints = [0, -0, 1, -7, 42, 1073741823, 1073741824, -1073741824, -1073741825, 2 ** 53 + 1, -(2 ** 64), 10 ** 30]
    values_text = (
        '{"floats_again": [' + ", ".join(floats) + '],\n'
        ' "ints": [' + ", ".join(str(i) for i in ints) + '],\n'
        ' "strings": ' + json.dumps(STRINGS, ensure_ascii=False) + ',\n'
        ' "escaped": ' + json.dumps(STRINGS, ensure_ascii=True) + ',\n'
        ' "surrogates": ["\\ud83d\\ude00", "\\u00e9\\u00E9", "\\/"],\n'
        ' "nested": {"a": [[], {}, [[1, [2, [3]]]], {"b": {"c": null}}], "t": true, "f": false, "n": null},\n'
        ' "empty_key": {"": 1},  "ws" :\t[ 1 ,\n 2 ] }'
    )
    doc = '{"values": ' + values_text + ', "floats": [' + ", ".join(floats) + '], "bad": ' + json.dumps(BAD) + "}"
    src = tmp_path / "in.json"
    src.write_bytes(doc.encode("utf-8"))
    out = tmp_path / "out.json"
    run_ok([CHECKED_IN, ST_TESTS / "json_roundtrip.st"], env={"NSB_JSON_IN": str(src), "NSB_OUT": str(out)})
    raw = out.read_bytes()
    result = json.loads(raw.decode("utf-8"))
    expected = json.loads(doc)

    # the reader: every float correctly rounded (bit-exact with Python's float())
    for text, (hi, lo) in zip(floats, result["float_bits"]):
        want = struct.unpack(">II", struct.pack(">d", float(text)))
        assert (hi, lo) == want, f"{text}: Squeak read {struct.unpack('>d', struct.pack('>II', hi, lo))[0]!r}"
    assert len(result["float_bits"]) == len(floats)
    # float32 rounding (NeuroScope's tensors): as numpy rounds the same double
    with np.errstate(over="ignore"):
        for text, (hi, lo) in zip(floats, result["float32_bits"]):
            want = struct.unpack(">II", struct.pack(">d", float(np.float32(float(text)))))
            assert (hi, lo) == want, f"{text}: float32 {struct.unpack('>d', struct.pack('>II', hi, lo))[0]!r}"

    # the writer: what Squeak writes back, Python reads as the same values (types and bits)
    strict_json_equal(result["echo"], expected)
    assert result["bad_caught"] == [True] * len(BAD)

    made = result["made"]
    assert made["latin1"] == "caf\u00e9"  # bytes that are not UTF-8: sent as Latin-1 characters
    assert made["utf8"] == "caf\u00e9"  # valid UTF-8 bytes: passed through
    assert made["controls"] == "\u0001\u007f\n"
    assert made["fraction"] == 1 / 3 and made["third"] == 1 / 3
    assert made["symbol"] == "foo" and made["character"] == "a"
    assert made["nan"] is None and made["infinity"] is None
    assert made["big"] == 2 ** 100 and made["negative_big"] == -(2 ** 70)
    assert math.copysign(1.0, made["negative_zero"]) == -1.0 and made["negative_zero"] == 0.0
    assert made["interval"] == [1, 2, 3] and made["ordered"] == [1.5, "x", None]
    assert made["tiny"] == 5e-324 and made["huge"] == 1.7976931348623157e308
    assert made["keys"] == {"1": True, "two": False}
    assert b"\\u00e9" in raw and "caf\u00e9".encode() in raw  # both string forms on the wire


# --- HTTP failures ---------------------------------------------------------------------------
class _Handler(socketserver.BaseRequestHandler):
    """Routes by path prefix; see smalltalk/tests/http_errors.st."""

    def _read_request(self):
        self.request.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, version = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", 0))
        while len(body) < n:
            chunk = self.request.recv(65536)
            if not chunk:
                break
            body += chunk
        return {"method": method, "path": path, "version": version, "headers": headers, "body": body}

    def _send(self, status, body: bytes, ctype="application/json", extra=""):
        head = (f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
        self.request.sendall(head.encode() + body)

    def handle(self):
        req = self._read_request()
        if req is None:
            return
        self.server.seen.append(req)
        path = req["path"]
        if path.startswith("/silent"):
            self.server.stop.wait(30)
        elif path.startswith("/error400"):
            self._send(400, json.dumps({"error": {"message": "model folder not found: /no/such/model",
                                                  "type": "invalid_request_error", "param": "model_path",
                                                  "code": "model_not_found"}}).encode())
        elif path.startswith("/error500"):
            self._send(500, b"Internal Server Error", "text/plain")
        elif path.startswith("/badjson"):
            self._send(200, b"<html>not json</html>", "text/html")
        elif path.startswith("/close"):
            pass
        elif path.startswith("/keepalive"):
            self._send(200, b'{"status": "ok"}', extra="Connection: keep-alive\r\n")
            self.server.stop.wait(15)
        elif path.startswith("/chunked"):
            body = b'{"status": "ok", "n": 12345}'
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n"
                                 + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:]))
        elif path.startswith("/echo"):
            try:
                parsed = json.loads(req["body"]) if req["body"] else None
            except ValueError:
                parsed = None
            self._send(200, json.dumps({"method": req["method"], "path": path, "headers": req["headers"],
                                        "json": parsed}).encode())
        else:
            self._send(404, b'{"error": {"message": "no route"}}')


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def bad_server():
    server = _Server(("127.0.0.1", 0), _Handler)
    server.seen, server.stop = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_http_failures_are_errors_not_hangs(bad_server):
    base = "http://127.0.0.1:%d" % bad_server.server_address[1]
    env = {"NSB_BASE": base, "NSB_REFUSED": "http://127.0.0.1:%d" % _refused_port()}
    started = time.monotonic()
    r = run_ok([CHECKED_IN, ST_TESTS / "http_errors.st"], env=env, timeout=90)
    assert time.monotonic() - started < 60, r.describe()
    echo = [q for q in bad_server.seen if q["path"] == "/echo/v1/chat/completions/with_activations"]
    assert len(echo) == 1
    req = echo[0]
    assert req["version"] == "HTTP/1.0" and req["headers"]["connection"] == "close"
    assert int(req["headers"]["content-length"]) == len(req["body"])
    body = json.loads(req["body"])
    assert body["messages"] == [{"role": "user", "content": 'Hi "there"'}]
    assert body["activation_hooks"] == [{"layer_name": "transformer.h.3", "component": "residual",
                                         "capture_input": False, "capture_output": True}]
    assert body["max_tokens"] == 2 and body["temperature"] == 0
    assert {q["method"] for q in bad_server.seen} <= {"GET", "POST", "PUT"}
