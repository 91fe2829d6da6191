"""Shared fixtures: tiny random models (fast), the real default model (slow), a live server."""

from __future__ import annotations

from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import pytest

import tests.server_process
from tests.server_process import free_port  # noqa: F401  (tests import it from here)

from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _tiny_model_fixtures(arch: str):
    """Session fixtures for one tiny random architecture: its HF-layout folder and the loaded model."""

    @pytest.fixture(scope="session")
    def path(tmp_path_factory) -> Path:
        return make_tiny_model(tmp_path_factory.mktemp("tiny") / f"tiny-{arch}", arch)

    @pytest.fixture(scope="session")
    def loaded(request):
        from engine.model import load_model

        return load_model(str(request.getfixturevalue(f"tiny_{arch}_path")), f"tiny-{arch}")

    return path, loaded


tiny_llama_path, tiny_llama = _tiny_model_fixtures("llama")
tiny_gpt2_path, tiny_gpt2 = _tiny_model_fixtures("gpt2")
tiny_qwen2_path, tiny_qwen2 = _tiny_model_fixtures("qwen2")
tiny_qwen3_path, tiny_qwen3 = _tiny_model_fixtures("qwen3")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from engine.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def default_model(default_model_path):
    from engine.default_model import MODEL_ID
    from engine.model import load_model

    return load_model(str(default_model_path), MODEL_ID)


class ServerProcess(tests.server_process.ServerProcess):
    """A real `nsbridge serve` on loopback, ready when constructed."""

    def __init__(self, model: str | None, state_dir: Path, extra: list[str] = (), env: dict | None = None):
        super().__init__(model, state_dir, extra, env)
        self.wait_ready(120)


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


@pytest.fixture
def registry(tmp_path):
    """A shared-memory registry for one test (state in tmp_path/"state"); fails if a segment is left."""
    from shm import ShmRegistry, segments

    reg = ShmRegistry(state_dir=tmp_path / "state", cleanup_at_exit=False)
    yield reg
    names = reg.owned_names()
    reg.close()
    assert not [n for n in names if segments.exists(n)], "segments left in /dev/shm"
