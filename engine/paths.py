"""Where nsbridge keeps its files: $NSBRIDGE_HOME, else ~/.cache/nsbridge."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = os.environ.get("NSBRIDGE_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nsbridge"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
