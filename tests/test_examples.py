"""Each example script runs against the real default model and prints its summary: slow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, base_url: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--base-url", base_url, *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_basic_capture(live_server):
    out = run_example("basic_capture.py", live_server.base_url)
    assert "smollm2-135m-instruct" in out and "(30 layers, d_model 576)" in out
    assert "Paris" in out and "layer 29 residual [1," in out
    assert out.rstrip().endswith("BASIC CAPTURE OK")


def test_circuit_analysis(live_server, tmp_path):
    out = run_example("circuit_analysis.py", live_server.base_url, "--export", str(tmp_path / "run.arrow"))
    assert "90 hooks on 30 layers, transport shm" in out
    assert "mapped zero-copy: True" in out and "largest MLP write: layer" in out
    assert "read back identical: True" in out
    assert out.rstrip().endswith("CIRCUIT ANALYSIS OK")
    out = run_example("circuit_analysis.py", live_server.base_url, "--transport", "inline")
    assert "CIRCUIT ANALYSIS OK" in out


def test_attention_analysis(live_server):
    out = run_example("attention_analysis.py", live_server.base_url)
    assert "query 'she' = position" in out
    assert out.count("majority") == 30
    assert "summary over 270 heads" in out and "she -> Mary:" in out
    assert out.rstrip().endswith("ATTENTION ANALYSIS OK")


def test_streaming(live_server):
    out = run_example("streaming.py", live_server.base_url)
    assert "reply: " in out and "step 0: residual [" in out and "step 1: residual [1, 576]" in out
    assert "assembled: residual [1," in out
    assert out.rstrip().endswith("STREAMING OK")
