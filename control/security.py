"""Which requests may reach the app at all: Host, Origin, body type and size, API key.

A page on any web site can make the visitor's browser send requests to 127.0.0.1:
- "simple" cross-site requests (`text/plain`, form types or no content type) are sent without a
  CORS preflight, so the server runs them before any CORS rule is consulted;
- DNS rebinding (the page's own name re-pointed at 127.0.0.1) makes such requests same-origin,
  so the page can also read every answer; only the `Host` header still shows the foreign name.
Ollama's CVE-2024-28224 is this attack on a model server. Jupyter, Vite and webpack-dev-server
answer with a Host allow-list; so does this module, plus an Origin check, a JSON-only body rule
and a body-size limit. All are pure ASGI and look only at headers and the body as it arrives:
they run before routing, before any body is parsed, and never touch a streaming response.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import orjson
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control.errors import error_body

DEFAULT_MAX_BODY_BYTES = 4 << 20  # a long chat fits many times over; a 200 MB JSON body is refused unread
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
ANY_ADDRESS = ("0.0.0.0", "::", "")


@dataclass
class SecurityConfig:
    allowed_hosts: list[str] = field(default_factory=list)  # besides loopback; "*" turns the Host check off
    bound_host: str = "127.0.0.1"  # the --host address, served by name too unless it is 0.0.0.0 or ::
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_key: str | None = None


def security_middleware(config: SecurityConfig) -> list[Middleware]:
    """The middleware stack, outermost first.

    Host and Origin come first: a foreign caller gets nothing, not even a CORS preflight answer.
    CORS sits inside them so that an allowed origin's preflight is answered and its page can read
    the refusals below it (415, 413, 401) as well as the app's own errors.
    """
    stack = [Middleware(CallerGuard, config=config)]
    if config.cors_origins:
        stack.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
                                allow_headers=["Authorization", "Content-Type"]))
    stack.append(Middleware(BodyGuard, max_body_bytes=config.max_body_bytes))
    if config.api_key:
        stack.append(Middleware(APIKeyMiddleware, api_key=config.api_key))
    return stack


# --- refusals ---------------------------------------------------------------------------------
async def refuse(scope: Scope, send: Send, status: int, code: str, message: str, error_type: str) -> None:
    """An error in the server's JSON shape. A request whose body is still unread gets
    `Connection: close`, so the server never drains a body it has refused (h11 would read it all)."""
    if scope["type"] == "websocket":  # closing before accepting: the server answers the handshake with 403
        await send({"type": "websocket.close", "code": 1008, "reason": code})
        return
    body = orjson.dumps(error_body(message, error_type, code))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if _has_body(_headers(scope)):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> dict[bytes, list[str]]:
    out: dict[bytes, list[str]] = {}
    for name, value in scope["headers"]:
        out.setdefault(name.lower(), []).append(value.decode("latin-1"))
    return out


def _has_body(headers: dict[bytes, list[str]]) -> bool:
    if b"transfer-encoding" in headers:
        return True
    try:
        return any(int(v) > 0 for v in headers.get(b"content-length", []))
    except ValueError:
        return True


# --- Host and Origin: who is calling ----------------------------------------------------------
def split_host(value: str) -> tuple[str, str | None] | None:
    """A Host header value -> (lowercased name, port or None); IPv6 stays bracketed. None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[:end + 1], value[end + 1:]) if end > 1 else ("", "")
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    port = rest[1:]
    if not name or (rest and (rest[0] != ":" or not (port.isdigit() or port == ""))):
        return None
    return name, port or None


def host_name(address: str) -> str:
    """A bind address or --allowed-host entry as it appears in a Host header (IPv6 is bracketed)."""
    return f"[{address}]" if address.count(":") >= 2 and not address.startswith("[") else address.lower()


class CallerGuard:
    """Refuses a Host this server does not answer to (DNS rebinding) and an Origin it does not
    trust (any method, any content type: a cross-site POST needs no preflight when it is "simple")."""

    def __init__(self, app: ASGIApp, config: SecurityConfig):
        self.app = app
        self.any_host = "*" in config.allowed_hosts
        names = list(LOOPBACK_HOSTS) + [h for h in config.allowed_hosts if h != "*"]
        if config.bound_host not in ANY_ADDRESS:
            names.append(host_name(config.bound_host))
        # An entry without a port matches any port; "name:port" matches that port only.
        self.allowed_hosts = {split_host(host_name(n)) or (n.lower(), None) for n in names}
        self.allowed_names = sorted({n for n, _ in self.allowed_hosts})
        self.any_origin = "*" in config.cors_origins
        self.cors_origins = set(config.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # no routes use websockets; any that would, are guarded
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        hosts = headers.get(b"host", [])
        for host in hosts:
            if not self._host_allowed(host):
                # 400, as Django's ALLOWED_HOSTS answers. 421 (Misdirected Request) would fit RFC 9110's
                # wording too, but browsers treat 421 as a connection-pooling problem and may resend the
                # request on a fresh connection; 403 is kept for the Origin refusal below.
                await refuse(scope, send, 400, "host_not_allowed", self._host_message(host), "invalid_request_error")
                return
        # No Host at all is HTTP/1.0 from a program: browsers always send one, so rebinding cannot produce it.
        scheme = scope.get("scheme", "http")
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)  # handshakes carry http(s) origins
        own_origin = f"{scheme}://{hosts[0].strip().lower()}" if hosts else None
        for origin in headers.get(b"origin", []):
            if not self._origin_allowed(origin, own_origin):
                await refuse(scope, send, 403, "origin_not_allowed", self._origin_message(origin),
                             "permission_error")
                return
        await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name, _ = parsed
        return (name, None) in self.allowed_hosts or parsed in self.allowed_hosts

    def _origin_allowed(self, origin: str, own_origin: str | None) -> bool:
        origin = origin.strip()
        if origin == "null":  # file:// pages and sandboxed frames of any site: no one in particular
            return False
        return self.any_origin or origin in self.cors_origins or origin.lower() == own_origin

    def _host_message(self, host: str) -> str:
        return (f"Host {host!r} is not served: this server answers only to {', '.join(self.allowed_names)} "
                f"(any port). A web page can point its own name at this machine (DNS rebinding), so other "
                f"names are refused; if clients really reach the server by this name, start it with "
                f"--allowed-host {(split_host(host) or (host,))[0]}")

    def _origin_message(self, origin: str) -> str:
        if origin.strip() == "null":
            return ("requests from pages with 'Origin: null' (file:// pages, sandboxed frames) are refused: "
                    "serve the page over http(s) and start the server with --cors-origin ORIGIN for its origin")
        return (f"requests from pages of origin {origin!r} are refused: a page may use this server only from "
                f"its own origin or one it was started with; start it with --cors-origin {origin} to allow "
                f"that page")


# --- the body: JSON only, and not too much of it ----------------------------------------------
class BodyTooLarge(Exception):
    """Raised from `receive` to unwind the app once the 413 has been sent."""


class BodyGuard:
    """A body must be `application/json` (a browser can send any other type cross-site without a
    preflight) and at most `max_body_bytes`, counted as it arrives, so a chunked body is cut off too.

    Starlette's own limit (`Starlette(max_body_size=...)`, 1.x only) answers plain text and only
    once the app reads; this one refuses a declared Content-Length before reading a byte.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if _has_body(headers):
            types = headers.get(b"content-type", [])
            if len(types) != 1 or types[0].split(";")[0].strip().lower() != "application/json":
                got = f"'Content-Type: {types[0]}'" if len(types) == 1 else (
                    "no Content-Type" if not types else "several Content-Type headers")
                await refuse(scope, send, 415, "unsupported_media_type",
                             f"a request body must be JSON sent with 'Content-Type: application/json' (got {got})",
                             "invalid_request_error")
                return
            lengths = headers.get(b"content-length", [])
            if any(int(v) > self.max_body_bytes for v in lengths if v.strip().isdigit()):
                await refuse(scope, send, 413, "body_too_large", self._too_large(), "invalid_request_error")
                return

        received, started, refused = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    if not started:
                        refused = True
                        await refuse(scope, send, 413, "body_too_large", self._too_large(), "invalid_request_error")
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already; whatever the app still says is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if not refused:  # the app answered before reading its whole body: too late for a 413
                raise

    def _too_large(self) -> str:
        return (f"the request body is larger than this server's limit of {self.max_body_bytes} bytes "
                f"({self.max_body_bytes / (1 << 20):g} MiB): send less, or start the server with "
                f"--max-body-size (e.g. --max-body-size 16M)")


# --- API key ----------------------------------------------------------------------------------
# Paths served without the API key: liveness, and the viewer's static files (a browser navigating to
# /viz cannot send a token; the page holds no data and asks for the key before it fetches any).
PUBLIC_PATHS = ("/health", "/viz")
PUBLIC_PREFIXES = ("/viz/",)


class APIKeyMiddleware:
    """Bearer-token check for every route but the public paths and preflights (a browser sends no token there)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if scope["type"] == "http" and not public and scope["method"] != "OPTIONS":
            auth = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
            if not secrets.compare_digest(auth, self.expected):  # bytes: any header compares, in constant time
                await refuse(scope, send, 401, "invalid_api_key",
                             "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
                return
        await self.app(scope, receive, send)
