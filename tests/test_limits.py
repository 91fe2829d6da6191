"""Work a request may ask for is bounded and checked against the loaded model, through real HTTP:
max_tokens beyond the context, top_k beyond the vocabulary, server-wide caps on tokens and wall
time (reported in /health), and a huge prompt that must not block other clients."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.conftest import ServerProcess
from tests.test_server import assert_error, assert_serving, chat_body

CHAT = "/v1/chat/completions"
CONTEXT = 256  # tests/tiny_models.py: max_position_embeddings of the tiny llama


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    s = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("limits"),
                      extra=["--max-tokens-per-request", "64", "--max-seconds-per-request", "0.001",
                             "--max-body-size", "16M"])
    yield s
    s.stop()


def test_limits_are_reported_in_health(server):
    limits = requests.get(server.base_url + "/health", timeout=10).json()["limits"]
    assert limits["max_tokens_per_request"] == 64 and limits["max_seconds_per_request"] == 0.001


def test_max_tokens_over_the_server_cap_is_400(server):
    err = assert_error(requests.post(server.base_url + CHAT, json=chat_body(max_tokens=65), timeout=30), 400,
                       param="max_tokens")
    assert "64" in err["message"] and "65" in err["message"]


def test_prompt_plus_max_tokens_beyond_the_context_is_400_with_the_numbers(tiny_server):
    r = requests.post(tiny_server.base_url + CHAT, json=chat_body(max_tokens=10**12), timeout=30)
    err = assert_error(r, 400, "context_length_exceeded", param="max_tokens")
    assert str(CONTEXT) in err["message"] and str(10**12) in err["message"]
    long = {"messages": [{"role": "user", "content": "Paris " * 400}], "max_tokens": 1}
    err = assert_error(requests.post(tiny_server.base_url + CHAT, json=long, timeout=30), 400,
                       "context_length_exceeded", param="messages")
    assert str(CONTEXT) in err["message"]
    # Left out, max_tokens is what fits (OpenAI's default), not an error.
    r = requests.post(tiny_server.base_url + CHAT, json={"messages": chat_body()["messages"]}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= CONTEXT


def test_top_k_beyond_the_vocabulary_is_400_not_500(tiny_server):
    vocab = requests.get(tiny_server.base_url + "/v1/models", timeout=10).json()["data"][0]["vocab_size"]
    err = assert_error(requests.post(tiny_server.base_url + CHAT, json=chat_body(top_k=vocab + 1), timeout=30),
                       400, param="top_k")
    assert str(vocab) in err["message"]
    r = requests.post(tiny_server.base_url + CHAT, json=chat_body(top_k=vocab, max_tokens=2), timeout=30)
    assert r.status_code == 200, r.text


def test_wall_time_cap_ends_generation_with_length(server, tiny_server):
    """A 1 ms cap is spent by the prefill: one token, then "length" (the same request without the
    cap generates more)."""
    body = chat_body(max_tokens=20)
    uncapped = requests.post(tiny_server.base_url + CHAT, json=body, timeout=60).json()
    capped = requests.post(server.base_url + CHAT, json=body, timeout=60).json()
    assert uncapped["usage"]["completion_tokens"] > 1
    assert capped["usage"]["completion_tokens"] == 1 and capped["choices"][0]["finish_reason"] == "length"


def test_a_huge_prompt_does_not_block_other_clients(server):
    """Tokenizing 12 MiB of text takes seconds; it must not run on the event loop."""
    huge = {"messages": [{"role": "user", "content": "The capital of France is Paris. " * 400_000}],
            "max_tokens": 1}
    result: dict = {}

    def send():
        result["response"] = requests.post(server.base_url + CHAT, json=huge, timeout=300)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)  # the body is uploaded and being tokenized
    health_waits = []
    while sender.is_alive() and len(health_waits) < 50:
        t0 = time.perf_counter()
        assert requests.get(server.base_url + "/health", timeout=30).status_code == 200
        health_waits.append(time.perf_counter() - t0)
        time.sleep(0.1)
    sender.join()
    assert_error(result["response"], 400, "context_length_exceeded", param="messages")
    assert health_waits, "the huge request finished before /health could be asked"
    assert max(health_waits) < 2.0, health_waits  # a blocked loop would answer only after tokenizing
    assert_serving(server.base_url)
