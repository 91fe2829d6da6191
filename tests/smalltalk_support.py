"""What the Smalltalk tests share: the project's Squeak harness and a strict JSON comparison."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_harness():
    """smalltalk/harness/run.py as a module (it is a script folder, not a package)."""
    name = "nsbridge_smalltalk_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "smalltalk" / "harness" / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def strict_json_equal(a, b, where="$"):
    """JSON values equal with types (int vs float) and float bits (so -0.0 != 0.0)."""
    assert type(a) is type(b), f"{where}: {a!r} ({type(a).__name__}) vs {b!r} ({type(b).__name__})"
    if isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            strict_json_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            strict_json_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"
