"""Harvest jobs over HTTP (`POST /v1/harvest`, status, cancel) on a real server on loopback (tiny llama),
driven through the Python bridge.

The server's output must equal the command line's for the same documents and options, row for
row; chat requests must be answered while a job runs (each forward is one turn of the model's
queue); a cancelled job keeps only whole shards; a client can neither read files outside the
allowed directories nor choose where the server writes.
"""

from __future__ import annotations

import json
import time

import pyarrow.dataset as pads
import pytest

from bridge.client import LMStudioNeuroScopeClient, NeuroScopeServerError
from harvest.job import HarvestOptions, run_harvest
from harvest.store import MANIFEST, PROGRESS
from tests.conftest import ServerProcess
from tests.test_harvest import HOOKS, corpus, read_dir, write_jsonl


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("harvest-server")
    (root / "inputs").mkdir()
    (root / "state").mkdir()
    proc = ServerProcess(str(tiny_llama_path), root / "state",
                         extra=["--harvest-dir", str(root / "jobs"), "--allow-model-dir", str(root / "inputs")])
    proc.root = root
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with LMStudioNeuroScopeClient(server.base_url) as c:
        yield c


def wait(client, job_id: str, states=("completed", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.harvest_status(job_id)
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def test_inline_documents_equal_the_local_run(client, server, tiny_llama, tmp_path):
    docs = corpus(3)
    options = dict(context=64, shard_rows=60, batch_size=4)
    status = client.harvest(HOOKS[:3], docs, wait=True, **options)
    assert status["state"] == "completed" and status["error"] is None
    out = server.root / "jobs" / status["id"]
    assert status["out"] == str(out)
    progress = status["progress"]
    assert progress["tokens_done"] == progress["tokens_total"] == status["result"]["tokens"] > 0
    assert progress["bytes_written"] == status["result"]["bytes"] > 0 and progress["tokens_per_s"] > 0
    local = run_harvest(tiny_llama, write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "local",
                        HarvestOptions(hooks=HOOKS[:3], **options), stream=None)
    assert read_dir(out).equals(read_dir(tmp_path / "local"))  # row for row, bit for bit
    assert status["result"]["shards"] == len(local["shards"]) and (out / MANIFEST).exists()

    # a file in an allowed directory, by path
    src = write_jsonl(server.root / "inputs" / "docs.jsonl", docs)
    by_path = client.harvest(HOOKS[:3], input_path=str(src), wait=True, **options)
    assert read_dir(server.root / "jobs" / by_path["id"]).equals(read_dir(tmp_path / "local"))
    assert by_path["id"] in [j["id"] for j in client.request("GET", "/v1/harvest")["data"]]


def test_chat_interleaves_and_cancel_keeps_whole_shards(client, server):
    docs = [{"text": f"Document number {i} says hello to the world."} for i in range(3000)]
    status = client.harvest(HOOKS[:1], docs, context=64, shard_rows=200, batch_size=1)
    job_id = status["id"]
    assert status["state"] == "running"
    wait_until = time.monotonic() + 60
    while client.harvest_status(job_id)["progress"]["bytes_written"] == 0:  # a first shard is written
        assert time.monotonic() < wait_until
        time.sleep(0.05)
    chat = client.chat([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert chat.text is not None
    during = client.harvest_status(job_id)
    assert during["state"] == "running", "the chat had to wait for the whole job"
    assert 0 < during["progress"]["tokens_done"] < during["progress"]["tokens_total"]
    assert during["progress"]["eta_s"] is not None
    cancelled = client.cancel_harvest(job_id)
    assert cancelled["state"] in ("cancelling", "cancelled")
    final = wait(client, job_id)
    assert final["state"] == "cancelled" and final["result"] is None
    out = server.root / "jobs" / job_id
    assert not (out / MANIFEST).exists() and (out / PROGRESS).exists()
    listed = json.loads((out / PROGRESS).read_text())["shards"]
    assert listed and pads.dataset(out).count_rows() == sum(s["rows"] for s in listed)  # only whole shards
    assert all(p.name.startswith(("shard-", "_progress")) for p in out.iterdir())
    # DELETE is the same as POST .../cancel, and a finished job stays as it is
    assert client.request("DELETE", f"/v1/harvest/{job_id}")["state"] == "cancelled"


def test_bad_requests(client, server, tmp_path):
    outside = write_jsonl(tmp_path / "secret.jsonl", corpus())
    cases = [
        ({"hooks": HOOKS[:1], "input_path": str(outside)}, 403, "input files must live under"),
        ({"hooks": HOOKS[:1], "input_path": "/etc/passwd"}, 403, "not allowed"),
        ({"hooks": HOOKS[:1], "input_path": str(server.root / "inputs" / "missing.jsonl")}, 400, "no such file"),
        ({"hooks": HOOKS[:1]}, 400, "exactly one of 'input_path'"),
        ({"hooks": ["blocks.9.hook_resid_post"], "documents": [{"text": "hi"}]}, 400, "unknown layer"),
        ({"hooks": [], "documents": [{"text": "hi"}]}, 400, "hooks"),
        ({"hooks": HOOKS[:1], "documents": [{"text": "hi"}], "out": "/tmp/x"}, 400, "out"),
        ({"hooks": HOOKS[:1], "documents": [{"text": "hi"}], "context": 10 ** 6}, 400, "context must be between"),
    ]
    for body, status, message in cases:
        with pytest.raises(NeuroScopeServerError) as err:
            client.request("POST", "/v1/harvest", body)
        assert err.value.status == status and message in str(err.value), (body, str(err.value))
    for method, path in (("GET", "/v1/harvest/harvest-nope"), ("POST", "/v1/harvest/harvest-nope/cancel")):
        with pytest.raises(NeuroScopeServerError) as err:
            client.request(method, path)
        assert err.value.status == 404
    # a document over the context fails the job, with the reason in its status and no shard written
    status = client.harvest(HOOKS[:1], [{"text": "Hello"}, {"text": "The answer. " * 40}], context=16)
    final = wait(client, status["id"])
    assert final["state"] == "failed" and "document 1) has" in final["error"]
    out = server.root / "jobs" / status["id"]
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".parquet"]


def test_values_equal_with_activations_over_http(client, server):
    """Each harvested value equals what /v1/chat/completions/with_activations captures for the same
    document, position and hook: exactly when each document has its forward to itself (batch_size 1),
    to float32 rounding when documents share forwards (the default)."""
    import numpy as np
    import pyarrow.compute as pc

    from bridge.client import entry_array
    from tests.test_harvest import assert_same

    docs = corpus()[3:]  # raw texts and chats
    hooks = ["blocks.1.hook_resid_post", "transformer.h.0:mlp", "hook_embed"]
    for batch_size, exact in ((1, True), (16, False)):
        status = client.harvest(hooks, docs, wait=True, context=64, batch_size=batch_size)
        table = read_dir(server.root / "jobs" / status["id"])
        for doc_id, doc in enumerate(docs):
            field = {"messages": doc["messages"]} if "messages" in doc else {"prompt": doc["text"]}
            answer = client.request("POST", "/v1/chat/completions/with_activations", {
                **field, "max_tokens": 1, "temperature": 0, "activation_positions": "prompt",
                "activations_encoding": "base64",
                "activation_hooks": [{"layer_name": h.partition(":")[0], "component": h.partition(":")[2] or None,
                                      "hook_id": h} for h in hooks]})
            rows = table.filter(pc.equal(table["doc_id"], doc_id)).sort_by("position")
            n = answer["usage"]["prompt_tokens"]
            assert rows.num_rows == n > 0
            for h in hooks:
                (entry,) = answer["activations"][h]  # the prompt: one step
                want = entry_array(entry)
                got = rows[h].combine_chunks().flatten().to_numpy().reshape(want.shape)
                assert got.dtype == np.float32 and assert_same(got, want, "float32", exact), (h, doc_id, batch_size)
