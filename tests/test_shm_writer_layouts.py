"""The writer's byte-copy path (joined runs of contiguous steps) against every step layout it
must refuse: transposed and strided MLX views, numpy steps mixed with MLX ones, bfloat16,
and runs cut into many joins. Each comes back bit-exact (`_check_roundtrip`)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import shm.writer as writer
from engine.records import StepTensor
from shm import open_capture, read_capture_bytes
from shm.writer import capture_to_bytes, write_capture
from tests.synthetic_capture import synthetic_capture
from tests.test_shm_format import _check_roundtrip


def _transposed(a: mx.array) -> mx.array:
    """The same values as a non-contiguous view (the memory holds the transpose)."""
    return mx.swapaxes(mx.contiguous(mx.swapaxes(a, 0, -1)), 0, -1)


def _strided(a: mx.array) -> mx.array:
    """The same values as a slice of a wider array (rows not adjacent in memory)."""
    return mx.concatenate([a, a], axis=-1)[..., : a.shape[-1]]


def _numpy(a: mx.array) -> np.ndarray:
    return np.asarray(a.view(mx.uint16)).copy() if a.dtype == mx.bfloat16 else np.array(a)


def _relayout(cap, how):
    for h in cap.hooks:
        steps = []
        for i, s in enumerate(h.steps):
            a = s.array
            if how == "transposed" and i % 2 == 0:
                a = _transposed(a)
            elif how == "strided" and i != 1:
                a = _strided(a)
            elif how == "mixed" and i % 2 == 1:
                a = _numpy(a)
            steps.append(StepTensor(s.step, s.start, a))
        h.steps = steps
    mx.eval([s.array for h in cap.hooks for s in h.steps if isinstance(s.array, mx.array)])
    return cap


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("how", ["transposed", "strided", "mixed"])
def test_step_layouts_round_trip(registry, how, dtype):
    cap = _relayout(synthetic_capture(layers=(0, 1), prompt_len=5, decode_steps=4, dtype=dtype), how)
    if how != "mixed":
        assert any(not memoryview(s.array).c_contiguous for h in cap.hooks for s in h.steps)
    _check_roundtrip(cap, read_capture_bytes(capture_to_bytes(cap)))
    with open_capture(write_capture(cap, registry)) as view:
        _check_roundtrip(cap, view)


def test_many_decode_steps_in_many_joins(monkeypatch):
    """Joins cut every few rows (and at the transposed prefill of Q/K/V) put each byte in place."""
    monkeypatch.setattr(writer, "_JOIN_BYTES", 200)
    cap = synthetic_capture(layers=(0,), prompt_len=7, decode_steps=40, d_model=16)
    _check_roundtrip(cap, read_capture_bytes(capture_to_bytes(cap)))
    cap = _relayout(cap, "strided")
    _check_roundtrip(cap, read_capture_bytes(capture_to_bytes(cap)))


def test_bytes_identical_to_a_numpy_copy_of_every_step():
    """The stream does not depend on where the steps' memory lies: MLX views or numpy copies."""
    cap = synthetic_capture(layers=(0, 2), prompt_len=6, decode_steps=5, capture_id="c")
    want = capture_to_bytes(cap).to_pybytes()
    for how in ("transposed", "strided"):
        got = capture_to_bytes(_relayout(synthetic_capture(layers=(0, 2), prompt_len=6, decode_steps=5, capture_id="c"), how))
        assert got.to_pybytes() == want
    for h in cap.hooks:
        h.steps = [StepTensor(s.step, s.start, _numpy(s.array)) for s in h.steps]
    assert capture_to_bytes(cap).to_pybytes() == want
