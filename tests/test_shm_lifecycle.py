"""Segment lifecycle: release, reuse, expiry, budget, crash cleanup, name checks, threads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shm import CaptureBudgetExceeded, ShmRegistry, StaleHandle, UnknownSegment, open_capture, segments
from shm.lifecycle import MiB, shm_space_message
from shm.pool import size_class
from tests.synthetic_capture import synthetic_capture
from shm.writer import write_capture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"  # where the shared `registry` fixture keeps its registry too


def _registry(state_dir, **kw) -> ShmRegistry:
    return ShmRegistry(state_dir=state_dir, cleanup_at_exit=False, **kw)


def _capture(tokens: int = 40, d_model: int = 4096, seed: int = 0):
    """One residual hook of tokens * d_model float32 (640 KiB by default)."""
    return synthetic_capture(components=("residual",), prompt_len=tokens, decode_steps=0, d_model=d_model, seed=seed)


def test_release_returns_segment_to_pool_for_reuse(registry):
    h1 = write_capture(_capture(seed=1), registry)
    assert [s["capture_id"] for s in registry.status()["segments"]] == [h1.capture_id]
    assert registry.release(h1.capture_id)
    assert not registry.release(h1.capture_id)  # once
    st = registry.status()
    assert st["segments"] == [] and st["pooled_segments"] == 1 and segments.exists(h1.name)
    with pytest.raises(UnknownSegment):
        registry.handle(h1.capture_id)
    h2 = write_capture(_capture(seed=2), registry)
    assert h2.name == h1.name and registry.status()["pooled_segments"] == 0


def test_released_handle_is_stale_not_silently_readable(registry):
    """A pooled segment still exists; opening the old handle must fail, not read released data."""
    h = write_capture(_capture(seed=3), registry)
    with open_capture(h) as cap:
        assert cap.capture_id == h.capture_id
    registry.release(h.capture_id)
    assert segments.exists(h.name)
    with pytest.raises(StaleHandle):
        open_capture(h)


def test_status_lists_live_segments(registry):
    h = write_capture(_capture(tokens=4, d_model=64), registry, ttl_s=30)
    (row,) = registry.status()["segments"]
    assert row["name"] == h.name and row["capture_id"] == h.capture_id and row["state"] == "live"
    assert row["byte_size"] == h.byte_size <= row["segment_size"]
    assert 0 <= row["age_s"] < 5 and 25 < row["expires_in_s"] <= 30
    assert registry.handle(h.capture_id) == h == registry.lookup(h.name)


def test_expiry_unlinks_without_harming_open_readers(registry):
    h = write_capture(_capture(tokens=4, d_model=64), registry, ttl_s=0.2)
    with open_capture(h) as view:
        before = view["residual_0"].data.copy()
        time.sleep(0.25)
        assert registry.status()["segments"] == []
        assert not segments.exists(h.name)  # unlinked, not pooled: never overwritten
        assert np.array_equal(view["residual_0"].data, before)  # mapping still valid
    assert not registry.release(h.capture_id)
    with pytest.raises(UnknownSegment):
        registry.lookup(h.name)


def test_budget_refuses_and_never_evicts_live_data(state_dir):
    reg = _registry(state_dir, budget_bytes=1 * MiB, pool_bytes=1 * MiB)
    try:
        first = write_capture(_capture(seed=1), reg)
        with pytest.raises(CaptureBudgetExceeded) as err:
            write_capture(_capture(seed=2), reg)
        e = err.value
        assert e.budget == 1 * MiB and e.live == size_class(first.byte_size) and e.live_count == 1
        assert "MiB" in str(e) and "release" in str(e)
        with open_capture(first) as view:  # untouched
            assert view.capture_id == first.capture_id
        reg.release(first.capture_id)
        second = write_capture(_capture(seed=2), reg)
        assert second.name == first.name
        with pytest.raises(CaptureBudgetExceeded):  # bigger than the whole budget
            write_capture(_capture(tokens=80), reg)
    finally:
        names = reg.owned_names()
        reg.close()
        assert not [n for n in names if segments.exists(n)]


def test_pooled_segments_give_way_to_new_captures(state_dir):
    reg = _registry(state_dir, budget_bytes=2 * MiB, pool_bytes=2 * MiB)
    try:
        small = write_capture(_capture(seed=1), reg)
        reg.release(small.capture_id)
        big = write_capture(_capture(tokens=80, seed=2), reg)  # 1.25 MiB: pool must shrink
        assert not segments.exists(small.name) and segments.exists(big.name)
        assert reg.status()["live_bytes"] + reg.status()["pooled_bytes"] <= 2 * MiB
    finally:
        reg.close()


def test_names_are_validated(registry):
    h = write_capture(_capture(tokens=2, d_model=8), registry)
    for bad in ["../../etc/passwd", "/nsb_" + "0" * 24, "nsb_XYZ", "", h.name + "0"]:
        with pytest.raises(UnknownSegment):
            registry.lookup(bad)
        assert not registry.release_name(bad)
    stranger = segments.new_name()  # well-formed but not ours
    with pytest.raises(UnknownSegment):
        registry.lookup(stranger)
    assert not registry.release_name(stranger)
    with pytest.raises(ValueError):
        open_capture({"name": "/etc/passwd", "byte_size": 8, "capture_id": "x"})
    assert registry.release_name(h.name)


def test_registry_file_and_close(state_dir):
    reg = _registry(state_dir)
    h = write_capture(_capture(tokens=2, d_model=8), reg)
    (path,) = state_dir.glob("owner-*.json")
    data = json.loads(path.read_text())
    assert data["pid"] == os.getpid() and h.name in data["segments"]
    assert (state_dir.stat().st_mode & 0o777) == 0o700
    reg.close()
    assert not segments.exists(h.name) and not list(state_dir.glob("owner-*.json"))


_CRASHER = textwrap.dedent(
    """
    import json, sys, time
    from shm import ShmRegistry
    from tests.synthetic_capture import synthetic_capture
    from shm.writer import write_capture
    reg = ShmRegistry(state_dir=sys.argv[1])
    done = write_capture(synthetic_capture(components=("residual",)), reg)
    midway = reg.acquire(1 << 20, "being-written")  # killed mid-capture
    print(json.dumps([done.name, midway.segment.name]), flush=True)
    time.sleep(60)
    """
)


def test_crashed_server_segments_are_removed_on_restart(state_dir):
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, str(state_dir)], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        names = json.loads(proc.stdout.readline())
        assert all(segments.exists(n) for n in names)
        live_owner = _registry(state_dir)  # the owner is alive: hands off
        assert live_owner.removed_orphans == [] and all(segments.exists(n) for n in names)
        live_owner.close()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    restarted = _registry(state_dir)
    try:
        assert sorted(restarted.removed_orphans) == sorted(names)
        assert not any(segments.exists(n) for n in names)
        assert len(list(state_dir.glob("owner-*.json"))) == 1  # only the new server's
    finally:
        restarted.close()


def test_small_shm_message():
    msg = shm_space_message(64 * MiB, 32 * MiB)
    assert msg and "64 MiB" in msg and "--shm-size" in msg
    assert "exceeds" in shm_space_message(8 << 30, 16 << 30)
    assert shm_space_message(8 << 30, 4 << 30) is None


def test_concurrent_writers_and_readers(registry):
    errors: list[BaseException] = []

    # MLX graphs are built here; the threads only copy out of evaluated arrays, as the
    # server's worker threads do.
    caps = [[_capture(tokens=8, d_model=256, seed=100 * i + j) for j in range(4)] for i in range(6)]

    def work(i: int) -> None:
        try:
            for cap in caps[i]:
                h = write_capture(cap, registry)
                with open_capture(h) as view:
                    assert np.array_equal(view["residual_0"].data, np.asarray(cap.hooks[0].steps[0].array))
                assert registry.release(h.capture_id)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    st = registry.status()
    assert st["segments"] == [] and st["pooled_segments"] <= 6


def test_read_bytes_and_prewarm(registry):
    registry.prewarm(3 * MiB)
    st = registry.status()
    assert st["pooled_segments"] == 1 and st["segments"] == []
    cap = _capture(tokens=64, d_model=4096)  # 1 MiB: lands in the pre-warmed segment
    h = write_capture(cap, registry)
    assert registry.status()["pooled_segments"] == 0
    from shm import read_capture_bytes

    data = registry.read_bytes(h.capture_id)
    assert len(data) == h.byte_size
    view = read_capture_bytes(data)
    assert np.array_equal(view["residual_0"].data, np.asarray(cap.hooks[0].steps[0].array))
    with pytest.raises(ValueError, match="already stored"):
        write_capture(cap, registry)
