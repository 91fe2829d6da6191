"""Round trips through the Arrow stream, in bytes and in real shared memory."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from multiprocessing import resource_tracker, shared_memory

import mlx.core as mx
import numpy as np
import pyarrow as pa
import pytest

from engine.records import CaptureResult, to_numpy
from shm import FORMAT_VERSION, StaleHandle, open_capture, read_capture_bytes
from shm import segments
from shm.format import KEY_PAD, pad_bits
from tests.synthetic_capture import ALL_COMPONENTS, synthetic_capture
from shm.writer import capture_to_bytes, plan_capture, write_capture

ROOT = Path(__file__).resolve().parents[1]


def _check_roundtrip(cap: CaptureResult, view) -> None:
    """Every step of every hook comes back bit-exact, token-major, with exact key padding."""
    n_rows = sum(s.n_tokens for s in cap.hooks[0].steps)
    assert len(view.step) == len(view.position) == n_rows
    assert len(view) == len(cap.hooks)
    for rec, h in zip(cap.hooks, view):  # columns are in hook order
        assert h.data.shape[0] == n_rows and h.dtype == rec.dtype
        for st in rec.steps:
            want = np.moveaxis(to_numpy(st.array), rec.token_axis, 0)
            got = h.for_step(st.step)
            assert got.shape == want.shape, (rec.component, got.shape, want.shape)
            assert got.dtype == want.dtype
            assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
            assert list(view.position[h.rows(st.step)]) == list(range(st.start, st.start + st.n_tokens))
            if rec.component in KEY_PAD:
                padding = h.data[h.rows(st.step)][..., want.shape[-1] :]
                assert (padding == pad_bits(rec.component, rec.dtype)).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_every_component_and_dtype(registry, dtype):
    cap = synthetic_capture(layers=(0, 3), prompt_len=5, decode_steps=4, dtype=dtype)
    _check_roundtrip(cap, read_capture_bytes(capture_to_bytes(cap)))
    handle = write_capture(cap, registry)
    with open_capture(handle) as view:
        _check_roundtrip(cap, view)
        assert view.capture_id == cap.capture_id and view.model_id == "synthetic"
        assert view.tokens == cap.tokens and view.token_ids == cap.token_ids
        assert view.prompt_tokens == 5
        assert list(view.token_id) == cap.token_ids  # the last generated token is fed too: it has a row


def test_layouts_and_metadata():
    cap = synthetic_capture(prompt_len=4, decode_steps=2, d_model=16, n_heads=4, n_kv_heads=2, d_head=8)
    view = read_capture_bytes(capture_to_bytes(cap))
    assert view["residual_0"].data.shape == (6, 16)
    assert view["query_0"].data.shape == (6, 4, 8)  # token-major [T, H, d_head]
    assert view["key_0"].data.shape == (6, 2, 8)
    assert view["attention_pattern_0"].data.shape == (6, 4, 6)  # [T_q, H, T_k final]
    assert view["attention_pattern_0"].for_step(1).shape == (1, 4, 5)
    info = view["value_0"].info
    assert (info.layer_name, info.module_path, info.layer_index) == ("transformer.h.0", "model.layers.0", 0)
    assert info.component == "value" and info.is_input is False and info.dim_names == ("token", "head", "d_head")
    assert view["attention_scores_0"].info.key_pad == -np.inf
    assert view["attention_pattern_0"].info.key_pad == 0.0
    assert view.info.format == FORMAT_VERSION


def test_bfloat16_decodes_exactly():
    cap = synthetic_capture(components=("residual",), dtype="bfloat16")
    view = read_capture_bytes(capture_to_bytes(cap))
    h = view["residual_0"]
    assert h.data.dtype == np.uint16 and h.info.dtype == "bfloat16"
    want = np.concatenate([np.asarray(s.array.astype(mx.float32)) for s in cap.hooks[0].steps])
    assert np.array_equal(h.to_float32(), want)


def test_plain_pyarrow_reader_as_documented():
    """The example in docs/shm-format.md, with pyarrow alone."""
    cap = synthetic_capture(components=("residual", "attention_pattern"), decode_steps=2)
    data = capture_to_bytes(cap).to_pybytes()
    table = pa.ipc.open_stream(data).read_all()
    meta = table.schema.metadata
    assert meta[b"nsbridge.format"].decode() == FORMAT_VERSION
    assert json.loads(meta[b"nsbridge.tokens"]) == cap.tokens
    resid = table.column("residual_0").chunk(0).to_numpy_ndarray()
    assert resid.shape == (8, 32)
    field = table.schema.field("attention_pattern_0")
    assert json.loads(field.metadata[b"nsbridge.shape"]) == [4, 8]
    steps = table.column("step").to_numpy()
    assert list(steps) == [0] * 6 + [1, 2]


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="the doc snippet shows the < 3.13 unregister")
def test_docs_example_runs(registry):
    """The 'plain pyarrow' snippet of docs/shm-format.md, executed against a real segment."""
    doc = (ROOT / "docs" / "shm-format.md").read_text()
    code = doc.split("## Reading with plain pyarrow", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    cap = synthetic_capture(components=("residual",), layers=(5,), decode_steps=3)
    cap.hooks[0].hook_id = "resid_5"
    handle = write_capture(cap, registry)
    scope = {"handle": handle.to_dict(), "print": lambda *a: None}
    exec(code, scope)  # noqa: S102 - our own documentation
    assert scope["tokens"] == cap.tokens
    assert scope["decode_rows"].shape == (3, 32)
    assert segments.exists(handle.name)  # the snippet's reader did not unlink it


def test_zero_copy_and_exact_size(registry):
    cap = synthetic_capture(prompt_len=64, decode_steps=8, d_model=256)
    plan = plan_capture(cap)
    handle = write_capture(cap, registry)
    assert handle.byte_size == plan.size and handle.offset == 0
    size = os.stat(f"/dev/shm/{handle.name}").st_size if sys.platform == "linux" else None
    with open_capture(handle) as view:
        seg = view.segment
        assert seg is not None and (size is None or size == seg.size)
        lo, hi = seg.address(), seg.address() + seg.size
        for h in view:
            assert lo <= h.data.ctypes.data and h.data.ctypes.data + h.data.nbytes <= hi
            assert not h.data.flags.writeable  # readers map read-only
        assert lo <= view.step.ctypes.data < hi


@pytest.mark.skipif(sys.platform != "linux", reason="/dev/shm")
def test_mode_0600_and_plain_sharedmemory_opens(registry):
    handle = write_capture(synthetic_capture(components=("mlp",)), registry)
    assert stat.S_IMODE(os.stat(f"/dev/shm/{handle.name}").st_mode) == 0o600
    assert len(handle.name) <= 30 and handle.name.startswith("nsb_")
    shm = shared_memory.SharedMemory(name=handle.name)
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # 3.11: or exit unlinks it
        view = read_capture_bytes(shm.buf[handle.offset : handle.offset + handle.byte_size])
        assert view.capture_id == handle.capture_id
        view.close()
        del view
    finally:
        shm.close()


def test_empty_capture(registry):
    cap = CaptureResult("empty", "m", [1, 2], ["a", "b"], 2, [])
    handle = write_capture(cap, registry)
    with open_capture(handle) as view:
        assert len(view) == 0 and view.token_ids == [1, 2]


def test_inconsistent_hooks_are_refused():
    cap = synthetic_capture(components=("residual", "mlp"), decode_steps=2)
    cap.hooks[1].steps.pop()
    with pytest.raises(ValueError, match="same forward passes"):
        plan_capture(cap)


def test_one_hook_id_captured_as_input_and_output():
    """capture_input + capture_output give two records with one hook_id: columns stay unique."""
    cap = synthetic_capture(components=("residual", "mlp"), decode_steps=2)
    cap.hooks[1].hook_id, cap.hooks[1].is_input = "residual_0", True
    cap.hooks.append(synthetic_capture(components=("attention",), decode_steps=2).hooks[0])
    cap.hooks[2].hook_id = "step"  # a client may pick a reserved name too
    view = read_capture_bytes(capture_to_bytes(cap))
    assert list(view.hooks) == ["residual_0", "residual_0:input", "step:output"]
    assert [h.info.is_input for h in view.entries("residual_0")] == [False, True]
    assert view["step:output"].info.hook_id == "step" and view.step.dtype == np.int32
    _check_roundtrip(cap, view)


def test_stale_handle_after_reuse(registry):
    first = write_capture(synthetic_capture(components=("residual",), seed=1), registry)
    assert registry.release(first.capture_id)
    second = write_capture(synthetic_capture(components=("residual",), seed=2), registry)
    assert second.name == first.name  # the pool reused the segment
    with pytest.raises(StaleHandle):
        open_capture(first)
    with open_capture(second) as view:
        assert view.capture_id == second.capture_id


def test_components_cover_the_contract():
    """The ten components existing clients know, plus those added since (heads' outputs, neurons, routers)."""
    assert set(ALL_COMPONENTS) == {
        "residual", "attention", "mlp", "embedding", "layernorm",
        "attention_scores", "attention_pattern", "key", "query", "value",
    } | {"head_output", "mlp_activation", "router"}
