"""What a web page cannot make a local server do, through real HTTP against real servers.

A page on any site can make the browser POST to 127.0.0.1 without a CORS preflight (`text/plain`,
form types, no content type) and, with DNS rebinding, read the answers under its own name. The
server refuses a foreign Host (400), a foreign or `null` Origin (403), a body that is not JSON
(415) and a body over the limit (413, before reading it, or as a chunked body passes the limit),
while curl-like clients, the `openai` package, the Smalltalk client, allowed origins (with their
CORS preflight), the server's own origin and allow-listed names keep working.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

import pytest
import requests

from control.security import CallerGuard, SecurityConfig
from tests.conftest import ServerProcess
from tests.test_server import assert_error, assert_serving, chat_body

CHAT = "/v1/chat/completions"
ACT = "/v1/chat/completions/with_activations"
EVIL = "http://evil.example"
ALLOWED_ORIGIN = "http://neuroscope.example"
LIMIT = 4 << 20  # the default --max-body-size


def shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("nsb_*")}


def owned_segments(server: ServerProcess) -> set[str]:
    """The /dev/shm names a server's registry lists (live captures and its reuse pool)."""
    names: set[str] = set()
    for path in Path(server.state_dir).glob("owner-*.json"):
        names |= set(json.loads(path.read_text())["segments"])
    return names


def holders(name: str) -> set[int]:
    """Pids of the processes that map a segment."""
    pids = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if f"/dev/shm/{name}" in maps.read_text():
                pids.add(int(maps.parent.name))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return shm_names()


@pytest.fixture(scope="module")
def server(shm_before, tiny_llama_path, tmp_path_factory):
    """Default settings."""
    server = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("security"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def open_server(shm_before, tiny_llama_path, tmp_path_factory):
    """Opened deliberately: one page origin, one more Host name, a smaller body limit."""
    server = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("security-open"),
                           extra=["--cors-origin", ALLOWED_ORIGIN, "--allowed-host", "lab.example",
                                  "--max-body-size", "1M"])
    yield server
    server.stop()


class Reply:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def error(self, status: int, code: str, error_type: str = "invalid_request_error") -> dict:
        """The server's error shape, with this status and code."""
        assert self.status == status, (self.status, self.body[:500])
        assert self.headers["content-type"].startswith("application/json")
        body = self.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        err = body["error"]
        assert (err["code"], err["type"], err["param"]) == (code, error_type, None), err
        assert isinstance(err["message"], str) and len(err["message"]) > 20
        return err


def send(port: int, method: str, path: str, headers: dict, body: bytes | None = None,
         host: str = "127.0.0.1") -> Reply:
    """One request with exactly these headers (Host too: http.client would otherwise add its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def exchange(port: int, *parts: bytes) -> bytes:
    """Send parts over one raw connection, then read until the server closes it. The server may
    answer and close before all parts are sent: sending then stops, and what it answered is read."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while part := sock.recv(65536):
                data += part
        except ConnectionResetError:  # the unread rest of the body resets the connection after the answer
            pass
    return data


def raw_error(data: bytes, status: int, code: str) -> dict:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), data[:300]
    err = json.loads(body)["error"]
    assert err["code"] == code, err
    return err


def chat_bytes(**extra) -> bytes:
    return json.dumps(chat_body(max_tokens=2, **extra)).encode()


def model_id(base: str) -> str:
    return requests.get(base + "/health", timeout=10).json()["model_id"]


# --- Origin ----------------------------------------------------------------------------------
SIMPLE_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x", None]


@pytest.mark.parametrize("content_type", SIMPLE_TYPES)
@pytest.mark.parametrize("path", [CHAT, ACT, "/v1/models/load", "/v1/activations/hooks"])
def test_simple_cross_site_post_is_refused(server, path, content_type):
    headers = {"Origin": EVIL} | ({"Content-Type": content_type} if content_type else {})
    err = send(server.port, "POST", path, headers, chat_bytes()).error(403, "origin_not_allowed", "permission_error")
    assert EVIL in err["message"] and "--cors-origin" in err["message"]


@pytest.mark.parametrize("method,path,body", [
    ("POST", CHAT, chat_bytes()),  # JSON too: a preflight would have stopped a browser, but not curl
    ("POST", "/v1/models/load", b'{"model_path": "default", "model_id": "loaded-by-evil"}'),
    ("POST", "/v1/activations/hooks/clear", None),
    ("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/openapi.json", None),
    ("DELETE", "/v1/activations/hooks", None),
    ("OPTIONS", CHAT, None),
])
def test_foreign_origin_is_refused_whatever_the_request(server, method, path, body):
    headers = {"Origin": EVIL, "Access-Control-Request-Method": "POST"} if method == "OPTIONS" else {"Origin": EVIL}
    if body is not None:
        headers["Content-Type"] = "application/json"
    reply = send(server.port, method, path, headers, body)
    reply.error(403, "origin_not_allowed", "permission_error")
    assert "access-control-allow-origin" not in reply.headers
    assert model_id(server.base_url) == "tiny-llama"  # the load never ran


@pytest.mark.parametrize("origin", ["null", "http://127.0.0.1.evil.example", f"{ALLOWED_ORIGIN}.evil.example",
                                    "http://localhost", "https://127.0.0.1"])
def test_other_origins_are_refused(server, origin):
    err = send(server.port, "POST", CHAT, {"Origin": origin, "Content-Type": "application/json"},
               chat_bytes()).error(403, "origin_not_allowed", "permission_error")
    if origin == "null":
        assert "file://" in err["message"]


def test_own_origin_is_allowed(server):
    """Browsers send Origin on same-origin POSTs too: a page the server serves must work."""
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        reply = send(port, "POST", CHAT, {"Origin": f"http://{host}", "Content-Type": "application/json"},
                     chat_bytes(), host=host)
        assert reply.status == 200, reply.body[:300]
        assert reply.json()["object"] == "chat.completion"
    # Another loopback name is another origin.
    send(port, "POST", CHAT, {"Origin": f"http://localhost:{port}", "Content-Type": "application/json"},
         chat_bytes(), host=f"127.0.0.1:{port}").error(403, "origin_not_allowed", "permission_error")


def test_allowed_origin_with_preflight(open_server):
    base, port = open_server.base_url, open_server.port
    preflight = requests.options(base + CHAT, timeout=10, headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = requests.post(base + CHAT, headers={"Origin": ALLOWED_ORIGIN}, json=chat_body(max_tokens=2), timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    # The page can read the body refusals too (CORS sits outside them).
    reply = send(port, "POST", CHAT, {"Origin": ALLOWED_ORIGIN, "Content-Type": "text/plain"}, chat_bytes())
    reply.error(415, "unsupported_media_type")
    assert reply.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    # Other origins get a refusal, preflight or not, and no CORS header.
    for origin in (EVIL, "null"):
        r = requests.options(base + CHAT, headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
                             timeout=10)
        assert_error(r, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
        r = requests.post(base + CHAT, headers={"Origin": origin}, json=chat_body(max_tokens=2), timeout=10)
        assert_error(r, 403, "origin_not_allowed")


# --- Host ------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example:8080", "evil.example", "127.0.0.1.nip.io", "localhost.evil.example",
                                  "lab.example", "[::2]:8080", "0.0.0.0", "::1", "127.0.0.1:x", "a b"])
def test_foreign_host_is_refused(server, host):
    """DNS rebinding: the page's own name, resolved to 127.0.0.1, would make every answer readable."""
    for method, path, headers, body in (("GET", "/health", {}, None), ("GET", "/v1/models", {}, None),
                                        ("POST", CHAT, {"Content-Type": "application/json"}, chat_bytes())):
        err = send(server.port, method, path, headers, body, host=host).error(400, "host_not_allowed")
        assert "--allowed-host" in err["message"]
    # With its own origin too: that is exactly what a rebound page sends.
    send(server.port, "POST", CHAT, {"Origin": f"http://{host}", "Content-Type": "application/json"}, chat_bytes(),
         host=host).error(400, "host_not_allowed")


def test_foreign_host_message_names_the_option(server):
    err = send(server.port, "GET", "/v1/models", {}, host="evil.example:8080").error(400, "host_not_allowed")
    assert "--allowed-host evil.example" in err["message"] and "127.0.0.1" in err["message"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "localhost", "localhost:{port}", "LocalHost:{port}",
                                  "[::1]", "[::1]:{port}"])
def test_loopback_hosts_are_served(server, host):
    host = host.format(port=server.port)
    reply = send(server.port, "POST", CHAT, {"Content-Type": "application/json"}, chat_bytes(), host=host)
    assert reply.status == 200, reply.body[:300]


def test_http10_without_host_is_served(server):
    """Browsers always send Host, so a request without one cannot come from a rebound page."""
    head, _, body = exchange(server.port, b"GET /health HTTP/1.0\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["status"] == "ok"


def test_allowed_host_is_served(open_server):
    port = open_server.port
    for host in ("lab.example", f"lab.example:{port}", "LAB.example:80", f"localhost:{port}"):
        reply = send(port, "POST", CHAT, {"Content-Type": "application/json"}, chat_bytes(), host=host)
        assert reply.status == 200, (host, reply.body[:300])
    reply = send(port, "POST", CHAT, {"Content-Type": "application/json", "Origin": f"http://lab.example:{port}"},
                 chat_bytes(), host=f"lab.example:{port}")
    assert reply.status == 200, reply.body[:300]
    send(port, "GET", "/health", {}, host="evil.example").error(400, "host_not_allowed")


def test_bound_address_and_wildcard():
    """The --host address is served by name unless it is a wildcard; '*' turns the check off."""
    def allowed(config: SecurityConfig, host: str) -> bool:
        return CallerGuard(None, config)._host_allowed(host)

    assert allowed(SecurityConfig(bound_host="192.168.1.5"), "192.168.1.5:8080")
    assert allowed(SecurityConfig(bound_host="fe80::1"), "[fe80::1]:8080")
    assert not allowed(SecurityConfig(bound_host="0.0.0.0"), "0.0.0.0:8080")
    assert not allowed(SecurityConfig(bound_host="::"), "[::]:8080")
    assert not allowed(SecurityConfig(bound_host="0.0.0.0"), "192.168.1.5")
    assert allowed(SecurityConfig(allowed_hosts=["lab.example:8080"]), "lab.example:8080")
    assert not allowed(SecurityConfig(allowed_hosts=["lab.example:8080"]), "lab.example:9090")
    assert allowed(SecurityConfig(allowed_hosts=["*"]), "evil.example")


# --- the body --------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", SIMPLE_TYPES + ["application/jsonx", "text/json", "application/ld+json"])
def test_non_json_body_is_415(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    err = send(server.port, "POST", CHAT, headers, chat_bytes()).error(415, "unsupported_media_type")
    assert "application/json" in err["message"]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])
def test_json_body_types_pass(server, content_type):
    reply = send(server.port, "POST", CHAT, {"Content-Type": content_type}, chat_bytes())
    assert reply.status == 200, reply.body[:300]


def test_bodyless_posts_need_no_content_type(server):
    reply = send(server.port, "POST", "/v1/activations/hooks/clear", {}, None)
    assert reply.status == 200 and reply.json()["status"] == "cleared"
    reply = send(server.port, "POST", "/v1/activations/hooks/clear", {"Content-Type": "text/plain"}, b"")
    assert reply.status == 200
    send(server.port, "POST", "/v1/activations/cap_0000000000000000/release", {}, None).error(404, "not_found")


def test_declared_body_over_the_limit_is_413_at_once(server):
    """Content-Length 200 MB: refused from the headers, while the client has sent only 16 KiB."""
    started = time.perf_counter()
    data = exchange(server.port, f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                                 f"Content-Type: application/json\r\nContent-Length: {200 << 20}\r\n\r\n".encode()
                    + b'{"messages": "' + b"x" * (16 << 10))
    elapsed = time.perf_counter() - started  # the server closed too: it will not drain 200 MB
    err = raw_error(data, 413, "body_too_large")
    assert "--max-body-size" in err["message"] and "4 MiB" in err["message"]
    assert b"connection: close" in data.partition(b"\r\n\r\n")[0].lower()
    assert elapsed < 3


def chunked_head(port: int) -> bytes:
    return (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_chunked_body_over_the_limit_is_cut_off(server):
    """No length is declared: the body is counted as it streams and refused once past the limit."""
    size = 64 << 10
    parts = [chunked_head(server.port), chunk(b'{"m": "' + b"x" * (size - 7))]
    parts += [chunk(b"x" * size)] * (LIMIT // size + 1)  # just past the limit, and the body never ends
    started = time.perf_counter()
    raw_error(exchange(server.port, *parts), 413, "body_too_large")
    assert time.perf_counter() - started < 10


def test_chunked_and_large_bodies_under_the_limit_pass(server, open_server):
    body = chat_bytes()
    r = requests.post(server.base_url + CHAT, data=iter([body[:10], body[10:]]),
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    # 3 MiB of JSON: under the default 4 MiB, over the open server's 1M (as Content-Length and chunked).
    big = json.dumps(chat_body(max_tokens=2) | {"user": "x" * (3 << 20)}).encode()
    r = requests.post(server.base_url + CHAT, data=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code not in (413, 415), r.text[:300]
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(big)}\r\n\r\n").encode()
    err = raw_error(exchange(open_server.port, head, big), 413, "body_too_large")
    assert "1 MiB" in err["message"]
    raw_error(exchange(open_server.port, chunked_head(open_server.port), chunk(big), b"0\r\n\r\n"),
              413, "body_too_large")


# --- legitimate clients ------------------------------------------------------------------------
def test_curl_like_json_post(server):
    r = requests.post(server.base_url + CHAT, json=chat_body(max_tokens=2), timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = requests.post(server.base_url + ACT, json=chat_body(max_tokens=2, activation_hooks=[
        {"layer_name": "transformer.h.0", "component": "residual"}], activations_transport="shm"), timeout=30)
    assert r.status_code == 200, r.text[:300]
    cid = r.json()["capture"]["capture_id"]
    assert requests.post(f"{server.base_url}/v1/activations/{cid}/release", timeout=10).status_code == 200


def test_openai_package(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=30)
    resp = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_smalltalk_client_request_shape(server):
    """Exactly what smalltalk/LMStudioRESTClient.st's NSHttpClient sends: HTTP/1.0, `Host: host:port`,
    `Content-Type: application/json` with a body, none without, no Origin."""
    port = server.port
    for method, path, body in (("GET", "/v1/models", None), ("POST", CHAT, chat_bytes()),
                               ("POST", "/v1/activations/hooks/clear", None)):
        req = (f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n"
               "User-Agent: NeuroScope-LMStudioRESTClient\r\nConnection: close\r\n")
        if body is not None:
            req += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = exchange(port, req.encode() + b"\r\n" + (body or b""))
        assert data.split(b"\r\n")[0].split(b" ")[1] == b"200", data[:300]


# --- after all that ----------------------------------------------------------------------------
def test_still_serving_and_nothing_leaked(server, open_server, shm_before):
    for s in (server, open_server):
        assert_serving(s.base_url)
        assert requests.get(s.base_url + "/v1/activations", timeout=10).json()["segments"] == []
        assert "Traceback" not in s.log_tail(10 ** 7), s.log_tail()
    # Other test runs may share /dev/shm: a new segment that only other processes map is theirs.
    ours, owned = {server.proc.pid, open_server.proc.pid}, owned_segments(server) | owned_segments(open_server)
    leaked = {n for n in shm_names() - shm_before - owned if not holders(n) or holders(n) & ours}
    assert not leaked  # what our servers hold, their registries list (pooled for reuse, not leaked)


def test_websocket_handshakes_are_guarded_too():
    """No route uses websockets today; if one ever does, a foreign Host or Origin cannot open it."""
    import asyncio

    async def app(scope, receive, send):
        await send({"type": "websocket.accept"})

    def handshake(headers: list[tuple[bytes, bytes]]) -> list[dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "websocket.connect"}

        guard = CallerGuard(app, SecurityConfig())
        asyncio.run(guard({"type": "websocket", "scheme": "ws", "path": "/ws", "headers": headers}, receive, send))
        return sent

    assert handshake([(b"host", b"127.0.0.1:8080")]) == [{"type": "websocket.accept"}]
    own = [(b"host", b"127.0.0.1:8080"), (b"origin", b"http://127.0.0.1:8080")]  # browsers send http(s) origins
    assert handshake(own) == [{"type": "websocket.accept"}]
    for headers in ([(b"host", b"evil.example")], [(b"host", b"127.0.0.1:8080"), (b"origin", b"http://evil.example")]):
        [close] = handshake(headers)
        assert close["type"] == "websocket.close" and close["code"] == 1008
