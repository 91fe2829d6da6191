"""The server fuzzed against its own OpenAPI document with schemathesis.

Every operation, every check (server errors, status codes, content types, response schemas,
schema-invalid data rejected, schema-valid data accepted, Allow headers...), the examples,
coverage, fuzzing and stateful phases (chat responses link capture ids to the capture
endpoints), a fixed seed. tests/schemathesis.toml says which operations may answer 400 to
schema-valid data, and why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess

HERE = Path(__file__).resolve().parent
ST = Path(sys.executable).parent / "st"


@pytest.fixture(scope="module")  # its own server: the fuzzer loads models and registers hooks
def fuzz_server(tiny_llama_path, tmp_path_factory):
    server = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("fuzz-server"),
                           extra=["--allow-model-dir", str(tiny_llama_path.parent.parent)])
    yield server
    server.stop()


def test_schemathesis_finds_nothing(fuzz_server, tmp_path):
    base = fuzz_server.base_url
    result = subprocess.run(
        [str(ST), "--config-file", str(HERE / "schemathesis.toml"), "--no-color", "run", f"{base}/openapi.json",
         "--checks", "all", "--seed", "20261129", "--max-examples", "40", "--workers", "1",
         "--request-timeout", "60"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    summary = report.rsplit("SUMMARY", 1)[-1]
    paths = requests.get(base + "/openapi.json", timeout=10).json()["paths"]
    # Every documented operation was exercised, but the document's own, which schemathesis leaves out.
    operations = sum(len(ops) for path, ops in paths.items() if path != "/openapi.json")
    assert f"Tested: {operations}" in summary, summary
    assert "Failures:" not in summary, summary
    # Still serving afterwards, and every capture the fuzzer made can be listed and released.
    assert requests.get(base + "/health", timeout=10).json()["status"] == "ok"
    for capture in requests.get(base + "/v1/activations", timeout=10).json()["segments"]:
        assert requests.delete(f"{base}/v1/activations/{capture['capture_id']}", timeout=10).status_code == 200
