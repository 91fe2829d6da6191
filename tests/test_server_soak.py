"""Soak: a few hundred mixed requests keep the server's memory flat and leave no segments."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess
from tests.test_server import chat_body, sse_events

ACT = "/v1/chat/completions/with_activations"
HOOKS = [{"layer_name": "transformer.h.0", "component": "residual", "hook_id": "r0"},
         {"layer_name": "transformer.h.1", "component": "attention_pattern", "hook_id": "p1"},
         {"layer_name": "blocks.2.hook_mlp_out", "hook_id": "m2"}]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def owned_segments(state_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in state_dir.glob("owner-*.json"):
        names |= set(json.loads(path.read_text())["segments"])
    return names


@pytest.fixture(scope="module")
def soak_server(tiny_llama_path, tmp_path_factory):
    server = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("soak-server"))
    yield server
    server.stop()


def one_round(session: requests.Session, base: str, i: int) -> None:
    kind = i % 6
    n = 2 + i % 5
    if kind == 0:
        r = session.post(base + "/v1/chat/completions", json=chat_body(max_tokens=n), timeout=60)
        assert r.status_code == 200, r.text
    elif kind == 1:
        events = sse_events(session.post(base + "/v1/chat/completions", json=chat_body(max_tokens=n, stream=True),
                                         stream=True, timeout=60))
        assert events[-1] == "[DONE]"
    elif kind == 2:
        r = session.post(base + ACT, json=chat_body(max_tokens=n, activation_hooks=HOOKS), timeout=60)
        assert r.status_code == 200 and set(r.json()["activations"]) == {"r0", "p1", "m2"}
    elif kind in (3, 4):
        r = session.post(base + ACT, json=chat_body(max_tokens=n, activation_hooks=HOOKS, activations_transport="shm"),
                         timeout=60)
        assert r.status_code == 200, r.text
        cid = r.json()["capture"]["capture_id"]
        if kind == 3:
            assert session.get(f"{base}/v1/activations/{cid}", timeout=60).status_code == 200
            rel = session.delete(f"{base}/v1/activations/{cid}", timeout=60)
        else:
            rel = session.post(f"{base}/v1/activations/{cid}/release", timeout=60)
        assert rel.status_code == 200, rel.text
    else:
        events = sse_events(session.post(base + ACT, json=chat_body(max_tokens=n, activation_hooks=HOOKS, stream=True,
                                                                    activations_transport="shm"),
                                         stream=True, timeout=60))
        final = [e for e in events if isinstance(e, dict) and "capture" in e]
        assert len(final) == 1
        assert session.delete(f"{base}/v1/activations/{final[0]['capture']['capture_id']}", timeout=60).ok
        # and an error now and then
        assert session.post(base + ACT, json=chat_body(activation_hooks=[{"layer_name": "x", "component": "mlp"}]),
                            timeout=60).status_code == 400


def test_soak_memory_flat_and_no_leftover_segments(soak_server):
    base, pid = soak_server.base_url, soak_server.proc.pid
    session = requests.Session()
    for i in range(90):  # warm-up: caches, pooled segments, lazily built code paths
        one_round(session, base, i)
    before = rss_bytes(pid)
    started = time.perf_counter()
    n = 360
    for i in range(n):
        one_round(session, base, i)
    elapsed = time.perf_counter() - started
    after = rss_bytes(pid)
    growth = after - before
    assert growth < 50 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {n} requests ({before / 2**20:.0f} MiB before)"

    status = requests.get(base + "/v1/activations", timeout=10).json()
    assert status["segments"] == [] and status["live_bytes"] == 0
    owned = owned_segments(Path(soak_server.state_dir))
    assert len(owned) == status["pooled_segments"]  # only the reuse pool is left, and it is bounded
    assert status["pooled_bytes"] <= status["budget_bytes"] // 4
    for name in owned:
        assert Path("/dev/shm", name).exists()
    assert requests.get(base + "/health", timeout=10).json()["queued"] == 0
    print(f"soak: {n} requests in {elapsed:.1f} s, RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")

    soak_server.stop()  # a clean shutdown unlinks the pool too
    assert not [name for name in owned if Path("/dev/shm", name).exists()]
    assert not list(Path(soak_server.state_dir).glob("owner-*.json"))
