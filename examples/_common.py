"""Shared bits of the example scripts: argument parsing and the import path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base-url", default="http://127.0.0.1:8080", help="the server (default %(default)s)")
    p.add_argument("--api-key", default=None, help="if the server was started with --api-key")
    return p


def find_span(tokens: list[str], text: str, start_at: int = 0) -> tuple[int, int]:
    """The token range [i, j) whose text covers the last occurrence of `text` at or after
    token `start_at` (tokens are the decoded text of each position)."""
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t)
    joined = "".join(tokens)
    c = joined.rfind(text, starts[start_at] if start_at < len(starts) else 0)
    if c < 0:
        raise ValueError(f"{text!r} not found in the tokens")
    i = max(k for k, s in enumerate(starts) if s <= c)
    end = c + len(text)
    j = max(k for k, s in enumerate(starts) if s < end) + 1
    return i, j
