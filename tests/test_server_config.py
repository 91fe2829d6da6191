"""Server configurations through real HTTP: API key, CORS, no model, model reload, queue size,
capture and shared-memory budgets, capture TTL, default bind, and clients that disconnect.

Each configuration is its own `nsbridge serve` process (tiny models: each starts in seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess, free_port
from tests.test_server import assert_error, assert_serving, chat_body, live_captures, sse_events

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
ACT = "/v1/chat/completions/with_activations"
KEY = "s3cret-test-key"
ALLOWED_ORIGIN = "http://neuroscope.example"


def start(tmp_path_factory, name: str, model=None, extra=(), env=None) -> ServerProcess:
    return ServerProcess(str(model) if model else None, tmp_path_factory.mktemp(name), extra=list(extra), env=env)


def owned_segments(server: ServerProcess) -> set[str]:
    """Every /dev/shm name the server's registry lists (live captures and its reuse pool)."""
    names: set[str] = set()
    for path in Path(server.state_dir).glob("owner-*.json"):
        names |= set(json.loads(path.read_text())["segments"])
    return names


def wait_until(predicate, timeout: float, interval: float = 0.02) -> float:
    """Seconds until predicate() was true; fails after timeout."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.perf_counter() - start


def queued(base: str) -> int:
    return requests.get(base + "/health", timeout=10).json()["queued"]


class RawStream:
    """A streaming POST over a plain socket, so the test decides exactly when the client goes away."""

    def __init__(self, port: int, path: str, body: dict):
        payload = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        self.buf = b""

    def read_events(self, n: int) -> list[bytes]:
        """Read until at least n SSE `data:` events have arrived."""
        while self.buf.count(b"data: ") < n:
            part = self.sock.recv(65536)
            assert part, "server closed the stream early: " + self.buf[:500].decode(errors="replace")
            self.buf += part
        assert self.buf.startswith(b"HTTP/1.1 200"), self.buf[:300]
        return self.buf.split(b"data: ")[1:]

    def close(self) -> None:
        self.sock.close()


# --- a model that never ends on its own: generation runs to max_tokens (slow requests) ----------
@pytest.fixture(scope="module")
def endless_model_path(tiny_llama_path, tmp_path_factory) -> Path:
    """The tiny llama with no end-of-sequence token and an 8192-token context: ~2 ms a token here."""
    path = tmp_path_factory.mktemp("endless") / "endless-llama"
    shutil.copytree(tiny_llama_path, path)
    (path / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.update(max_position_embeddings=8192, eos_token_id=None)
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            data = json.loads((path / name).read_text())
            data.pop("eos_token", None)
            (path / name).write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def busy_server(endless_model_path, tmp_path_factory):
    server = start(tmp_path_factory, "busy-server", endless_model_path, ["--queue-size", "1"])
    yield server
    server.stop()


LONG = 8000  # tokens: ~15 s or more of generation if nothing stops it


def test_endless_model_really_runs_to_max_tokens(busy_server):
    r = requests.post(busy_server.base_url + CHAT, json=chat_body(content="Hello", max_tokens=300), timeout=60)
    body = r.json()
    assert body["usage"]["completion_tokens"] == 300 and body["choices"][0]["finish_reason"] == "length"


def test_queue_full_answers_503_with_retry_after(busy_server):
    base = busy_server.base_url
    slow = RawStream(busy_server.port, CHAT, chat_body(content="Hello", max_tokens=LONG, stream=True))
    try:
        slow.read_events(3)  # generating now: the one queue slot is taken
        assert queued(base) == 1
        for path, body in ((CHAT, chat_body()), (CHAT, chat_body(stream=True)),
                           (ACT, chat_body(activation_hooks=[{"layer_name": "transformer.h.0", "component": "mlp"}])),
                           (ACT, chat_body(stream=True, activations_transport="shm",
                                           activation_hooks=[{"layer_name": "transformer.h.0", "component": "mlp"}]))):
            r = requests.post(base + path, json=body, timeout=30)
            err = assert_error(r, 503, "queue_full")
            assert err["type"] == "server_busy"
            assert int(r.headers["Retry-After"]) >= 1
        # Everything that does not generate still answers.
        assert requests.get(base + "/health", timeout=10).status_code == 200
        assert requests.get(base + "/v1/models", timeout=10).status_code == 200
        assert requests.get(base + "/v1/activations/points", timeout=10).status_code == 200
    finally:
        slow.close()
    wait_until(lambda: queued(base) == 0, timeout=5)
    assert_serving(base)
    assert live_captures(base) == []


@pytest.mark.parametrize("path,extra", [
    (CHAT, {}),
    (ACT, {"activation_hooks": [{"layer_name": "transformer.h.1", "component": "residual"}]}),
    (ACT, {"activation_hooks": [{"layer_name": "transformer.h.1", "component": "residual"}],
           "activations_transport": "shm"}),
])
def test_client_disconnect_stops_generation(busy_server, path, extra):
    """A client that goes away mid-stream stops its generation within moments, and leaves no segment."""
    base = busy_server.base_url
    before = owned_segments(busy_server)
    stream = RawStream(busy_server.port, path, chat_body(content="Hello", max_tokens=LONG, stream=True, **extra))
    events = stream.read_events(5)
    assert b"chat.completion.chunk" in events[1]
    assert queued(base) == 1
    stream.close()
    stopped_after = wait_until(lambda: queued(base) == 0, timeout=5)
    assert stopped_after < 5  # running to max_tokens would take far longer
    t = time.perf_counter()
    r = requests.post(base + CHAT, json=chat_body(content="Hello", max_tokens=20), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
    assert time.perf_counter() - t < 3
    assert live_captures(base) == []
    assert owned_segments(busy_server) <= before  # nothing new in /dev/shm
    for name in owned_segments(busy_server):
        assert Path("/dev/shm", name).exists()  # the registry's list is the truth


def test_client_that_gives_up_on_a_plain_request_stops_its_generation(busy_server):
    base = busy_server.base_url
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(base + CHAT, json=chat_body(content="Hello", max_tokens=LONG), timeout=0.5)
    stopped_after = wait_until(lambda: queued(base) == 0, timeout=5)
    assert stopped_after < 5  # running to max_tokens would take far longer
    assert_serving(base)


def test_client_that_times_out_leaves_no_capture(busy_server):
    """A non-streamed shm request whose client gave up: nobody will release it, so the server does."""
    base = busy_server.base_url
    body = chat_body(content="Hello", max_tokens=800, activations_transport="shm",
                     activation_hooks=[{"layer_name": "transformer.h.1", "component": "residual"}])
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(base + ACT, json=body, timeout=0.3)
    wait_until(lambda: queued(base) == 0, timeout=30)
    assert live_captures(base) == []
    # A client that waits gets its capture, and it stays until released.
    out = requests.post(base + ACT, json={**body, "max_tokens": 5}, timeout=30).json()
    assert [s["capture_id"] for s in live_captures(base)] == [out["capture"]["capture_id"]]
    requests.delete(f"{base}/v1/activations/{out['capture']['capture_id']}", timeout=10)


def test_client_gone_while_its_capture_is_written_leaves_no_capture(busy_server):
    """The last chunk of an shm stream waits for the capture to be written; a client that leaves in
    that window never gets the handle, so the server releases the capture."""
    base = busy_server.base_url
    n = 1000
    body = chat_body(content="Hello", max_tokens=n, stream=True, activations_transport="shm",
                     activation_hooks=[{"layer_name": f"transformer.h.{i}", "component": "attention_pattern"}
                                       for i in range(3)])
    stream = RawStream(busy_server.port, ACT, body)
    stream.read_events(n)  # the role chunk and n - 1 tokens: the last one waits for the write
    t = time.perf_counter()
    stream.read_events(n + 1)
    gap = time.perf_counter() - t
    stream.close()
    cid = json.loads(stream.buf.split(b"data: ")[n + 1].split(b"\n\n")[0])["capture"]["capture_id"]
    assert requests.delete(f"{base}/v1/activations/{cid}", timeout=10).status_code == 200
    mid_write = 0
    for fraction in (0.2, 0.5):
        stream = RawStream(busy_server.port, ACT, body)
        stream.read_events(n)
        time.sleep(gap * fraction)
        stream.sock.setblocking(False)
        try:
            arrived = stream.sock.recv(1 << 20)
        except BlockingIOError:
            arrived = b""
        stream.close()
        wait_until(lambda: queued(base) == 0, timeout=30)
        time.sleep(gap + 0.3)  # the write, if one was under way, has landed
        left = [s["capture_id"] for s in live_captures(base)]
        if b'"capture"' in arrived:  # the handle reached the client first: releasing is its job
            for c in left:
                requests.delete(f"{base}/v1/activations/{c}", timeout=10)
            continue
        mid_write += 1
        assert left == [], f"left after a disconnect {fraction:.0%} into the write window"
    if not mid_write:
        pytest.skip("the final chunk always arrived before the client left; the window was not hit")


def test_requests_queue_in_order(busy_server):
    """Requests arriving while one generates wait their turn (queue of 1 = one running, none waiting)."""
    base = busy_server.base_url
    results: dict = {}

    def run(i):
        results[i] = requests.post(base + CHAT, json=chat_body(content="Hello", max_tokens=400), timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results.values())
    assert 200 in codes and set(codes) <= {200, 503}
    for r in results.values():
        if r.status_code == 503:
            assert_error(r, 503, "queue_full")
        else:
            assert r.json()["usage"]["completion_tokens"] == 400
    assert_serving(base)


# --- API key and CORS ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(tiny_llama_path, tmp_path_factory):
    server = start(tmp_path_factory, "secured", tiny_llama_path, ["--api-key", KEY, "--cors-origin", ALLOWED_ORIGIN])
    yield server
    server.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}
PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/models/load"), ("POST", CHAT), ("POST", ACT),
             ("GET", "/v1/activations/hooks"), ("POST", "/v1/activations/hooks"), ("DELETE", "/v1/activations/hooks"),
             ("POST", "/v1/activations/hooks/clear"), ("GET", "/v1/activations/points"), ("GET", "/v1/activations"),
             ("GET", "/v1/activations/cap_x"), ("DELETE", "/v1/activations/cap_x"),
             ("POST", "/v1/activations/cap_x/release"), ("GET", "/openapi.json"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": "Bearer "}])
def test_api_key_required(secured, headers):
    for method, path in PROTECTED:
        r = requests.request(method, secured.base_url + path, headers=headers, json=chat_body(), timeout=10)
        err = assert_error(r, 401, "invalid_api_key")
        assert err["type"] == "authentication_error"
        assert KEY not in r.text


def test_health_stays_open_and_key_works(secured):
    base = secured.base_url
    r = requests.get(base + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["model_loaded"] is True
    assert requests.get(base + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == "tiny-llama"
    r = requests.post(base + CHAT, headers=AUTH, json=chat_body(max_tokens=2), timeout=30)
    assert r.status_code == 200
    events = sse_events(requests.post(base + CHAT, headers=AUTH, json=chat_body(max_tokens=2, stream=True),
                                      stream=True, timeout=30))
    assert events[-1] == "[DONE]"
    # Errors behind the key are still the right errors.
    assert_error(requests.get(base + "/v1/activations/cap_x", headers=AUTH, timeout=10), 404, "not_found")
    assert_error(requests.post(base + CHAT, headers=AUTH, json={**chat_body(), "max_tokens": 0}, timeout=10), 400)
    assert KEY not in secured.log_tail(10 ** 7)  # never logged, not even in the access log


def test_openai_package_with_api_key(secured):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=secured.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    resp = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    bad = openai.OpenAI(base_url=secured.base_url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_api_key_allows_any_model_path(secured, tiny_llama_path, tmp_path):
    """With a token set, loading is not limited to the allow-listed directories."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_path, copy)
    r = requests.post(secured.base_url + "/v1/models/load", headers=AUTH,
                      json={"model_path": str(copy), "model_id": "tiny-llama"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "loaded"
    assert requests.post(secured.base_url + CHAT, headers=AUTH, json=chat_body(max_tokens=2),
                         timeout=30).status_code == 200


def test_cors_allow_list(secured):
    base = secured.base_url
    r = requests.get(base + "/v1/models", headers={**AUTH, "Origin": ALLOWED_ORIGIN}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = requests.get(base + "/health", headers={"Origin": ALLOWED_ORIGIN}, timeout=10)
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    # A browser must be able to read the 401 too.
    r = requests.get(base + "/v1/models", headers={"Origin": ALLOWED_ORIGIN}, timeout=10)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    # Preflight needs no token; it allows the methods SqueakJS and NeuroScope use.
    r = requests.options(base + CHAT, headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization, content-type"},
                         timeout=10)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert {"POST", "GET", "DELETE"} <= {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    # Other origins are refused, key or not, preflight or not, and get no CORS header (test_security.py).
    for origin in ("http://evil.example", ALLOWED_ORIGIN + ".evil.example", "null"):
        r = requests.get(base + "/v1/models", headers={**AUTH, "Origin": origin}, timeout=10)
        assert_error(r, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
        r = requests.options(base + CHAT, headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
                             timeout=10)
        assert_error(r, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    # A stream to the allowed origin carries the header.
    r = requests.post(base + CHAT, headers={**AUTH, "Origin": ALLOWED_ORIGIN},
                      json=chat_body(max_tokens=2, stream=True), stream=True, timeout=30)
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert sse_events(r)[-1] == "[DONE]"


# --- default bind, key from the environment ---------------------------------------------------
def test_default_bind_is_loopback_and_env_api_key(tmp_path):
    """No --host: the server listens on 127.0.0.1 only. NSBRIDGE_API_KEY works like --api-key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("NSBRIDGE_HOST", "NSBRIDGE_PORT")}
    env["NSBRIDGE_API_KEY"] = KEY
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "control.cli", "serve", "--port", str(port), "--no-model",
                             "--state-dir", str(tmp_path / "state")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                return requests.get(base + "/health", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(up, timeout=120, interval=0.1)
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            if not Path(table).exists():
                continue
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if int(p, 16) == port and state == "0A":  # LISTEN
                    listening.add(addr)
        assert listening == {"0100007F"}, listening  # 127.0.0.1 and nothing else
        assert requests.get(base + "/health", timeout=10).json()["model_loaded"] is False
        assert_error(requests.get(base + "/v1/models", timeout=10), 401, "invalid_api_key")
        assert requests.get(base + "/v1/models", headers=AUTH, timeout=10).json() == {"object": "list", "data": []}
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


# --- no model, load and reload -----------------------------------------------------------------
@pytest.fixture(scope="module")
def empty_server(tiny_llama_path, tiny_gpt2_path, tmp_path_factory):
    server = start(tmp_path_factory, "empty-server", None,
                   ["--no-model", "--allow-model-dir", str(tiny_llama_path.parent),
                    "--allow-model-dir", str(tiny_gpt2_path.parent)])
    yield server
    server.stop()


def test_no_model_then_load_then_reload(empty_server, tiny_llama_path, tiny_gpt2_path):
    base = empty_server.base_url
    hook = [{"layer_name": "transformer.h.1", "component": "residual", "hook_id": "r"}]
    health = requests.get(base + "/health", timeout=10).json()
    assert health["model_loaded"] is False and health["model_id"] is None
    assert requests.get(base + "/v1/models", timeout=10).json() == {"object": "list", "data": []}
    for method, path, body in [("POST", CHAT, chat_body()), ("POST", CHAT, chat_body(stream=True)),
                               ("POST", ACT, chat_body(activation_hooks=hook)),
                               ("POST", ACT, chat_body(activation_hooks=hook, stream=True,
                                                       activations_transport="shm")),
                               ("GET", "/v1/activations/points", None),
                               ("POST", "/v1/activations/hooks", {"hooks": hook})]:
        r = requests.request(method, base + path, json=body, timeout=10)
        err = assert_error(r, 409, "no_model_loaded")
        assert "/v1/models/load" in err["message"]
    assert requests.get(base + "/v1/activations/hooks", timeout=10).json()["count"] == 0
    assert requests.get(base + "/v1/activations", timeout=10).status_code == 200

    # Load: the contract's fields.
    r = requests.post(base + "/v1/models/load", json={"model_path": str(tiny_llama_path)}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "loaded" and body["supports_activations"] is True and body["model_id"]
    llama_id = body["model_id"]
    assert requests.get(base + "/v1/models", timeout=10).json()["data"][0]["id"] == llama_id
    assert requests.post(base + CHAT, json=chat_body(max_tokens=2), timeout=30).status_code == 200
    assert requests.post(base + "/v1/activations/hooks", json={"hooks": hook}, timeout=10).status_code == 200

    # A failed load keeps the current model.
    missing = tiny_llama_path.parent / "does-not-exist"
    r = requests.post(base + "/v1/models/load", json={"model_path": str(missing)}, timeout=60)
    assert 400 <= r.status_code < 500 and assert_error(r, r.status_code)
    assert requests.get(base + "/health", timeout=10).json()["model_id"] == llama_id

    # Reload: another architecture replaces the model; hooks named for the old one are dropped.
    r = requests.post(base + "/v1/models/load", json={"model_path": str(tiny_gpt2_path), "model_id": "tiny-gpt2"},
                      timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == "tiny-gpt2" and r.json()["status"] == "loaded"
    models = requests.get(base + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["tiny-gpt2"] and models[0]["architecture"] == "gpt2"
    assert requests.get(base + "/v1/activations/hooks", timeout=10).json()["count"] == 0
    points = requests.get(base + "/v1/activations/points", timeout=10).json()
    assert points["model_id"] == "tiny-gpt2"
    out = requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=hook), timeout=60)
    assert out.status_code == 200, out.text
    out = out.json()
    assert out["model"] == "tiny-gpt2" and out["activations"]["r"][0]["shape"][1] == 64
    # Forbidden paths stay forbidden.
    assert_error(requests.post(base + "/v1/models/load", json={"model_path": "/usr"}, timeout=30), 403)
    assert requests.get(base + "/health", timeout=10).json()["model_id"] == "tiny-gpt2"


# --- budgets and TTL ----------------------------------------------------------------------------
BIG_HOOKS = [{"layer_name": f"transformer.h.{i}", "component": c}
             for i in range(3) for c in ("attention_pattern", "attention_scores", "query", "key", "value", "residual")]
SMALL_HOOK = [{"layer_name": "transformer.h.0", "component": "residual", "hook_id": "r"}]


@pytest.fixture(scope="module")
def limited(tiny_llama_path, tmp_path_factory):
    """Per-request capture budget 64 KiB, captures live 1 s."""
    server = start(tmp_path_factory, "limited", tiny_llama_path, ["--capture-budget", "64K", "--shm-ttl", "1"])
    yield server
    server.stop()


@pytest.mark.parametrize("extra", [{}, {"stream": True}, {"activations_transport": "shm"},
                                   {"activations_transport": "shm", "stream": True}])
def test_capture_over_budget_is_413(limited, extra):
    base = limited.base_url
    r = requests.post(base + ACT, json=chat_body(max_tokens=100, activation_hooks=BIG_HOOKS, **extra), timeout=30)
    err = assert_error(r, 413, "capture_too_large", "activation_hooks")
    assert "budget" in err["message"] and "MiB" in err["message"]
    assert live_captures(base) == []
    # A capture under the budget passes; so does plain chat.
    r = requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=SMALL_HOOK), timeout=30)
    assert r.status_code == 200, r.text
    assert_serving(base)


def test_capture_ttl_expires(limited):
    base = limited.base_url
    out = requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=SMALL_HOOK,
                                                   activations_transport="shm"), timeout=30).json()
    cid, name = out["capture"]["capture_id"], out["capture"]["handle"]["name"]
    assert out["capture"]["handle"]["expires_at"] <= time.time() + 1.5
    assert requests.get(f"{base}/v1/activations/{cid}", timeout=10).status_code == 200
    time.sleep(1.3)
    assert_error(requests.get(f"{base}/v1/activations/{cid}", timeout=10), 404, "not_found")
    assert cid not in {s["capture_id"] for s in live_captures(base)}
    assert not Path("/dev/shm", name).exists()  # expired captures are unlinked, not pooled
    assert_error(requests.delete(f"{base}/v1/activations/{cid}", timeout=10), 404)
    assert_serving(base)


@pytest.fixture(scope="module")
def small_shm(tiny_llama_path, tmp_path_factory):
    """Shared memory for live captures limited to 64 KiB (one smallest segment)."""
    server = start(tmp_path_factory, "small-shm", tiny_llama_path, ["--shm-budget", "64K"])
    yield server
    server.stop()


def test_shm_budget_exceeded_is_413(small_shm):
    base = small_shm.base_url
    shm = dict(activations_transport="shm")
    first = requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=SMALL_HOOK, **shm), timeout=30)
    assert first.status_code == 200, first.text
    cid = first.json()["capture"]["capture_id"]
    # The budget is used up by a live capture: refused before generating, stream or not.
    for extra in ({}, {"stream": True}):
        r = requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=SMALL_HOOK, **shm, **extra),
                          timeout=30)
        err = assert_error(r, 413, "capture_too_large")
        assert "release" in err["message"]
    # Inline needs no shared memory.
    assert requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=SMALL_HOOK), timeout=30).ok
    assert requests.delete(f"{base}/v1/activations/{cid}", timeout=10).status_code == 200

    # One capture larger than the whole budget: known only after generation; nothing is left behind.
    r = requests.post(base + ACT, json=chat_body(max_tokens=60, activation_hooks=BIG_HOOKS, **shm), timeout=60)
    assert_error(r, 413, "capture_too_large")
    status = requests.get(base + "/v1/activations", timeout=10).json()
    assert status["segments"] == [] and status["live_bytes"] == 0
    assert_serving(base)
    ok = requests.post(base + ACT, json=chat_body(max_tokens=2, activation_hooks=SMALL_HOOK, **shm), timeout=30)
    assert ok.status_code == 200, ok.text
    requests.delete(f"{base}/v1/activations/{ok.json()['capture']['capture_id']}", timeout=10)


def test_shm_budget_exceeded_while_streaming_is_an_sse_error(small_shm):
    """The size is known only when the stream has started: the client gets an error event, then [DONE]."""
    base = small_shm.base_url
    r = requests.post(base + ACT, json=chat_body(max_tokens=60, activation_hooks=BIG_HOOKS, stream=True,
                                                 activations_transport="shm"), stream=True, timeout=60)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "capture_too_large"
    assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    assert live_captures(base) == []
    assert_serving(base)
