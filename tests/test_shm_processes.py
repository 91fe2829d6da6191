"""Readers in other processes: concurrent, zero-copy, and harmless when they exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from shm import open_capture, segments
from tests.synthetic_capture import synthetic_capture
from shm.writer import write_capture

ROOT = Path(__file__).resolve().parents[1]

# A consumer that has only the reader half: it must not need MLX or the engine.
_READER = textwrap.dedent(
    """
    import hashlib, json, sys
    from shm.reader import open_capture
    handle = json.loads(sys.argv[1])
    out = {}
    with open_capture(handle) as cap:
        lo = cap.segment.address()
        hi = lo + cap.segment.size
        for h in cap:
            a = h.data
            out[h.hook_id] = [hashlib.sha256(a.tobytes()).hexdigest(), lo <= a.ctypes.data < hi]
    out["_mlx_loaded"] = "mlx.core" in sys.modules or "engine" in sys.modules
    print(json.dumps(out))
    """
)


def _digests(handle) -> dict[str, str]:
    import hashlib

    with open_capture(handle) as cap:
        return {h.hook_id: hashlib.sha256(h.data.tobytes()).hexdigest() for h in cap}


def test_concurrent_reader_processes(registry):
    cap = synthetic_capture(layers=(0, 1), prompt_len=16, decode_steps=4, d_model=64, dtype="bfloat16")
    handle = write_capture(cap, registry)
    want = _digests(handle)
    arg = json.dumps(handle.to_dict())
    procs = [
        subprocess.Popen([sys.executable, "-c", _READER, arg], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "leaked" not in err and "resource_tracker" not in err, err
        results.append(json.loads(out))
    for r in results:
        assert r.pop("_mlx_loaded") is False
        assert {k: v[0] for k, v in r.items()} == want
        assert all(inside for _, inside in r.values())  # zero-copy in the reader process too
    # The readers have exited: the segment is still there, listed, and intact.
    assert segments.exists(handle.name)
    assert registry.lookup(handle.name) == handle
    assert _digests(handle) == want


def test_reader_killed_while_open_does_not_harm_segment(registry):
    cap = synthetic_capture(components=("residual", "attention_pattern"), prompt_len=8)
    handle = write_capture(cap, registry)
    want = _digests(handle)
    code = "import json,sys,os\nfrom shm.reader import open_capture\ncap = open_capture(json.loads(sys.argv[1]))\nprint('open', flush=True)\nos._exit(1)"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(handle.to_dict())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "open"
    assert segments.exists(handle.name) and _digests(handle) == want
    # And the producer may still release and reuse it afterwards.
    assert registry.release(handle.capture_id)
    cap2 = synthetic_capture(components=("residual", "attention_pattern"), prompt_len=8, seed=5)
    again = write_capture(cap2, registry)
    assert again.name == handle.name
    with open_capture(again) as view:
        assert np.array_equal(view["residual_0"].for_step(0), np.asarray(cap2.hooks[0].steps[0].array))
