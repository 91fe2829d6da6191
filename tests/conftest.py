"""Shared fixtures: tiny random models (fast), the real default model (slow), a live server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import pytest
import requests

from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path):
    from engine.model import load_model

    return load_model(str(tiny_llama_path), "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_path):
    from engine.model import load_model

    return load_model(str(tiny_gpt2_path), "tiny-gpt2")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from engine.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def default_model(default_model_path):
    from engine.default_model import MODEL_ID
    from engine.model import load_model

    return load_model(str(default_model_path), MODEL_ID)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `nsbridge serve` on loopback, in its own process."""

    def __init__(self, model: str | None, state_dir: Path, extra: list[str] = (), env: dict | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_path = model
        self.state_dir = state_dir
        cmd = [sys.executable, "-m", "control.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--state-dir", str(state_dir), *extra]
        if model:
            cmd += ["--model", str(model)]
        self.log_path = state_dir / "server.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(self.base_url + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start:\n" + self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_path, tmp_path_factory):
    server = ServerProcess(str(tiny_llama_path), tmp_path_factory.mktemp("tiny-server"),
                           extra=["--allow-model-dir", str(tiny_llama_path.parent.parent)])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_server(default_model_path, tmp_path_factory):
    """The real default model behind a real server (slow tests, Smalltalk tests)."""
    server = ServerProcess(str(default_model_path), tmp_path_factory.mktemp("live-server"))
    yield server
    server.stop()
