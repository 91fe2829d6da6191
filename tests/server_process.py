"""A real `nsbridge serve` in its own process on a free loopback port.

For tests, benchmarks and notebooks that need a server they own:

    with ServerProcess(model="/path/to/model") as server:
        requests.get(server.base_url + "/health")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts at construction; `wait_ready()` (or `with`) waits until it answers `ready_path`."""

    ready_path = "/health"

    def __init__(self, model: str | None = None, state_dir: str | Path | None = None, extra: list[str] = (),
                 env: dict | None = None, log_level: str = "info"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_path = model
        self.extra = list(extra)
        self.log_level = log_level
        self._tmp = None if state_dir is not None else tempfile.TemporaryDirectory(prefix="nsbridge-server-")
        self.state_dir = Path(state_dir if state_dir is not None else self._tmp.name)
        self.log_path = self.state_dir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=None if env is None else {**os.environ, **env})

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "control.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--state-dir", str(self.state_dir), "--log-level", self.log_level, *self.extra]
        return cmd + ["--model", str(self.model_path)] if self.model_path else cmd

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.base_url + self.ready_path, timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start in time:\n" + self.log_tail())

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
