"""Stored vectors (engine/vectors.py): every check, exact round trips, vectors from a real
capture (computed by the tiny model, passed through the Arrow stream as the server does) and
llama.cpp control vectors written by tests/gguf_writer.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct

import numpy as np
import pytest

from engine.errors import InvalidArgument, UnknownVector
from engine.vectors import Vector, VectorStore, read_gguf
from tests.gguf_writer import controlvector_bytes, gguf_bytes, write_gguf

# The tiny llama's sizes (tests/tiny_models.py); every size distinct, so each check is visible.
DIMS = {"d_model": 64, "d_head": 16, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 128, "n_experts": 0, "n_layers": 3}
RNG = np.random.default_rng(0)


@pytest.fixture
def store() -> VectorStore:
    return VectorStore(DIMS)


def refused(call, arg: str, *fragments: str, cls=InvalidArgument) -> InvalidArgument:
    """`call()` raises `cls` naming `arg`, with every fragment in its message."""
    with pytest.raises(cls) as info:
        call()
    err = info.value
    assert err.arg == arg, (err.arg, err.message)
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    return err


# ---- inline numbers ----

def test_inline_list_round_trips_exactly(store):
    values = RNG.standard_normal(64).tolist()
    vec = store.add(values, name="happy", layer=2)
    assert isinstance(vec, Vector) and vec.vector_id.startswith("vec_") and len(vec.vector_id) == 20
    assert vec.data.dtype == np.float32 and vec.data.shape == (64,)
    assert np.array_equal(vec.data, np.asarray(values, np.float32))
    # what a client reads back (float32 -> JSON -> float32) is the same vector
    assert np.array_equal(store.add(json.loads(json.dumps(vec.data.tolist()))).data, vec.data)
    assert (vec.name, vec.layer, vec.source) == ("happy", 2, {"kind": "inline"})
    assert store.get(vec.vector_id) is vec


def test_vector_is_read_only_and_a_copy(store):
    mine = np.ones(64, np.float32)
    vec = store.add(mine)
    mine[0] = 5.0
    assert vec.data[0] == 1.0
    assert not vec.data.flags.writeable
    with pytest.raises(ValueError):
        vec.data[0] = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        vec.layer = 1


@pytest.mark.parametrize("shape", [(64,), (128,), (16,), (4, 16), (2, 16)])
def test_every_site_shape_is_accepted(store, shape):
    vec = store.add(RNG.standard_normal(shape).tolist())
    assert vec.data.shape == shape


def test_integers_and_float16_arrays_are_accepted(store):
    assert np.array_equal(store.add(list(range(64))).data, np.arange(64, dtype=np.float32))
    assert store.add([2**70] * 64).data[0] == 2.0**70  # beyond int64, still a float32
    half = RNG.standard_normal(16).astype(np.float16)
    assert np.array_equal(store.add(half).data, half.astype(np.float32))


@pytest.mark.parametrize("data, fragments", [
    ([], ["empty"]),
    ([[]], ["empty"]),
    ([[1.0, 2.0], [3.0]], ["ragged"]),
    ([[[0.0] * 16] * 4] * 2, ["3 dimensions", "[n] or [heads, d_head]"]),
    ([float("nan")] + [0.0] * 63, ["non-finite", "index 0"]),
    ([0.0] * 63 + [float("inf")], ["non-finite", "index 63"]),
    ([0.0] * 10 + [1e39] + [0.0] * 53, ["non-finite", "float32's range", "index 10"]),
    ([[0.0] * 16, [0.0] * 15 + [float("-inf")]] + [[0.0] * 16] * 2, ["non-finite", "index [1, 15]"]),
    (["a"] * 64, ["only numbers"]),
    ([None] * 64, ["only numbers"]),
    ([True] * 64, ["only numbers"]),
    (5.0, ["single number"]),
    ("0.5, 1.0", ["list of numbers", "str"]),
    ({"data": [1.0]}, ["list of numbers", "dict"]),
    (None, ["list of numbers"]),
    ([0.0] * 20 + [float("nan")] * 44, ["44 non-finite", "indices 20, 21, 22, 23, 24, ..."]),
    ([2**200] * 64, ["non-finite", "float32's range"]),
    ([0.0] * 37, ["length 37", "d_model 64", "d_mlp 128", "d_head 16"]),
    ([[0.0] * 16] * 3, ["[3, 16]", "heads 2 or 4", "d_head 16"]),
    ([[0.0] * 64] * 4, ["[4, 64]", "[heads, d_head]"]),
])
def test_bad_numbers_are_refused(store, data, fragments):
    refused(lambda: store.add(data), "vector", *fragments)
    assert len(store) == 0


@pytest.mark.parametrize("kw, arg, fragment", [
    ({"name": ""}, "name", "non-empty string"),
    ({"name": 7}, "name", "non-empty string"),
    ({"name": "x" * 201}, "name", "at most 200"),
    ({"layer": 3}, "layer", "3 layers, numbered 0 to 2"),
    ({"layer": -1}, "layer", "does not exist"),
    ({"layer": True}, "layer", "integer"),
    ({"layer": "1"}, "layer", "integer"),
])
def test_bad_name_or_layer_is_refused(store, kw, arg, fragment):
    refused(lambda: store.add([0.0] * 64, **kw), arg, fragment)


# ---- base64 ----

def test_base64_float32_round_trips_exactly(store):
    values = np.concatenate([RNG.standard_normal(60), [-0.0, 1e-45, 3.4e38, -1e-40]]).astype(np.float32)
    vec = store.add_base64(base64.b64encode(values.astype("<f4").tobytes()).decode(), "float32", name="b")
    assert vec.data.tobytes() == values.tobytes()  # bit for bit, signed zero and subnormals included
    assert vec.source == {"kind": "base64", "dtype": "float32"} and vec.name == "b"


def test_base64_float16_and_bfloat16_decode_exactly(store):
    half = RNG.standard_normal((4, 16)).astype("<f2")
    vec = store.add_base64(base64.b64encode(half.tobytes()), "float16", [4, 16])
    assert vec.data.shape == (4, 16) and np.array_equal(vec.data, half.astype(np.float32))

    full = RNG.standard_normal(128).astype(np.float32)
    bits = (full.view(np.uint32) >> 16).astype("<u2")  # bfloat16 = the high half of float32
    vec = store.add_base64(base64.b64encode(bits.tobytes()).decode(), "bfloat16", layer=1)
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    assert vec.data.tobytes() == expected.tobytes() and vec.layer == 1
    assert np.allclose(vec.data, full, rtol=2**-7)


def _b64(array) -> str:
    return base64.b64encode(np.asarray(array).tobytes()).decode()


@pytest.mark.parametrize("args, arg, fragments", [
    ((_b64(np.zeros(64, "<f4")), "float64"), "dtype", ["float64", "float32, float16, bfloat16"]),
    (("!!not base64!!", "float32"), "vector", ["not valid base64"]),
    (("AAAA\nAAAA", "float32"), "vector", ["not valid base64", "line breaks"]),
    ((12345, "float32"), "vector", ["base64 string"]),
    ((base64.b64encode(b"\0" * 6).decode(), "float32"), "vector", ["6 bytes", "multiple of 4"]),
    ((base64.b64encode(b"\0" * 7).decode(), "bfloat16"), "vector", ["7 bytes", "multiple of 2"]),
    ((_b64(np.zeros(64, "<f4")), "float32", [4, 8]), "shape", ["[4, 8]", "32 numbers", "64 float32"]),
    ((_b64(np.zeros(64, "<f4")), "float32", [0, 64]), "shape", ["positive integers"]),
    ((_b64(np.zeros(64, "<f4")), "float32", [2, 2, 16]), "shape", ["one or two"]),
    ((_b64(np.zeros(64, "<f4")), "float32", "64"), "shape", ["list"]),
    ((_b64(np.zeros(48, "<f4")), "float32"), "vector", ["length 48"]),
    ((_b64(np.zeros(0, "<f4")), "float32"), "vector", ["empty"]),
    ((_b64(np.full(16, np.inf, "<f2")), "float16"), "vector", ["non-finite"]),
    ((_b64(np.array([0x7FC0] * 16, "<u2")), "bfloat16"), "vector", ["non-finite"]),  # bfloat16 NaN
])
def test_bad_base64_is_refused(store, args, arg, fragments):
    refused(lambda: store.add_base64(*args), arg, *fragments)
    assert len(store) == 0


# ---- the store ----

def test_get_delete_list_len_contains(store):
    a, b = store.add([1.0] * 64), store.add([2.0] * 16)
    assert len(store) == 2 and a.vector_id in store and "vec_0000000000000000" not in store and None not in store
    assert store.list() == [a, b]
    store.delete(a.vector_id)
    assert store.list() == [b] and a.vector_id not in store
    err = refused(lambda: store.get(a.vector_id), "vector_id", repr(a.vector_id), "list the stored vectors",
                  cls=UnknownVector)
    assert isinstance(err, InvalidArgument) and "/v1" not in err.message and "HTTP" not in err.message
    refused(lambda: store.delete(a.vector_id), "vector_id", "no vector", cls=UnknownVector)
    refused(lambda: store.get(None), "vector_id", "no vector", cls=UnknownVector)
    long = refused(lambda: store.get("x" * 500), "vector_id", "...", cls=UnknownVector)
    assert len(long.message) < 250


def test_full_store_says_to_delete(store):
    small = VectorStore(DIMS, max_vectors=2)
    first = small.add([0.0] * 64)
    small.add([0.0] * 64)
    refused(lambda: small.add([0.0] * 64), "vector", "full", "2 of 2", "delete")
    # an import that does not fit stores none of its directions
    small.delete(first.vector_id)
    refused(lambda: small.import_controlvector(controlvector_bytes({1: np.ones(64), 2: np.ones(64)})),
            "vector", "full", "2 vectors")
    assert len(small) == 1
    small.add([0.0] * 64)
    assert len(small) == 2


def test_describe_is_json_and_has_no_data(store):
    vec = store.add([3.0, 4.0] + [0.0] * 14, name="n", layer=0)
    d = json.loads(json.dumps(vec.describe()))
    assert d == {"vector_id": vec.vector_id, "name": "n", "shape": [16], "dtype": "float32", "layer": 0,
                 "source": {"kind": "inline"}, "created": vec.created, "norm": 5.0}
    per_head = store.add(np.ones((4, 16)))
    assert per_head.describe()["shape"] == [4, 16] and per_head.describe()["norm"] == 8.0


# ---- from a real capture ----

@pytest.fixture(scope="module")
def captures(tiny_llama):
    """The tiny model's real activations, float32 and bfloat16, through the Arrow stream bytes
    (as the server stores them) and shm.reader's HookArrays."""
    from engine.generate import generate
    from engine.params import CaptureOptions, SamplingParams
    from engine.plan import plan
    from shm.reader import read_capture_bytes
    from shm.writer import capture_to_bytes

    hooks = [{"layer_name": "model.layers.1", "component": "residual"},
             {"layer_name": "model.layers.2", "component": "query"},
             {"layer_name": "model.layers.0", "component": "attention_pattern"}]
    views = {}
    for dtype in ("float32", "bfloat16"):
        events = list(generate(plan(tiny_llama, prompt="The capital of France", hooks=hooks,
                                    sampling=SamplingParams(max_tokens=4, temperature=0),
                                    capture=CaptureOptions(dtype=dtype))))
        views[dtype] = read_capture_bytes(capture_to_bytes(events[-1].result.capture))
    dims = {**tiny_llama.info.dims, "n_layers": tiny_llama.info.n_layers}
    assert dims == DIMS  # the literal sizes the other tests use are the model's
    return views


def test_capture_mean_and_last_equal_numpy(store, captures):
    view = captures["float32"]
    resid = view["model.layers.1.residual"]
    P, pos, data = view.prompt_tokens, resid.position, resid.data
    assert len(pos) == P + 4 and P > 2

    def make(reduce, positions):
        return store.from_capture(resid, reduce=reduce, positions=positions, capture_id=view.capture_id,
                                  hook_id=resid.hook_id, prompt_tokens=P)

    def mean(mask):
        return data[mask].astype(np.float64).mean(axis=0).astype(np.float32)

    assert np.array_equal(make("mean", "all").data, mean(np.ones(len(pos), bool)))
    assert np.array_equal(make("mean", "prompt").data, mean(pos < P))
    assert np.array_equal(make("mean", "generated").data, mean(pos >= P))
    assert np.array_equal(make("mean", [0, 3]).data, mean(np.isin(pos, [0, 3])))
    assert np.array_equal(make("last", "all").data, data[np.argmax(pos)])
    assert np.array_equal(make("last", "prompt").data, data[pos == P - 1][0])
    assert np.array_equal(make("last", [2, 5, 3]).data, data[pos == 5][0])
    vec = make("mean", [1, 2])
    assert vec.layer == 1 and vec.data.shape == (64,)
    assert vec.source == {"kind": "capture", "capture_id": view.capture_id, "hook_id": resid.hook_id,
                          "component": "residual", "reduce": "mean", "positions": [1, 2], "count": 2}
    json.dumps(vec.describe())


def test_capture_per_head_and_bfloat16(store, captures):
    view = captures["float32"]
    query = view["model.layers.2.query"]
    vec = store.from_capture(query, reduce="mean", positions="all", capture_id=view.capture_id, hook_id=query.hook_id)
    assert vec.data.shape == (4, 16) and vec.layer == 2
    assert np.array_equal(vec.data, query.data.astype(np.float64).mean(axis=0).astype(np.float32))

    view16 = captures["bfloat16"]
    resid = view16["model.layers.1.residual"]
    assert resid.data.dtype == np.uint16
    vec = store.from_capture(resid, reduce="mean", positions="all", capture_id=view16.capture_id,
                             hook_id=resid.hook_id)
    assert np.array_equal(vec.data, resid.to_float32().astype(np.float64).mean(axis=0).astype(np.float32))
    last = store.from_capture(resid, reduce="last", positions=[1, 4], capture_id="c", hook_id=resid.hook_id)
    assert np.array_equal(last.data, resid.to_float32()[resid.position == 4][0])


def test_capture_checks(store, captures):
    view = captures["float32"]
    resid = view["model.layers.1.residual"]
    n = len(resid.position)

    def make(hook=resid, reduce="mean", positions="all", **kw):
        return lambda: store.from_capture(hook, reduce=reduce, positions=positions, capture_id=view.capture_id,
                                          hook_id=hook.hook_id, **kw)

    pos_arg = "from_capture.positions"
    refused(make(positions=[3, 99, 100]), pos_arg, "99, 100", "not in the capture", f"holds positions 0-{n - 1}",
            view.capture_id)
    refused(make(positions="last"), pos_arg, "reduce 'last'")
    refused(make(positions="some"), pos_arg, "'all', 'prompt', 'generated'")
    refused(make(positions=[]), pos_arg, "non-empty list")
    refused(make(positions=[1.5]), pos_arg, "integer")
    refused(make(positions=[True]), pos_arg, "integer")
    refused(make(positions="prompt"), "from_capture.prompt_tokens", "prompt_tokens")
    refused(make(positions="generated", prompt_tokens=n), pos_arg, "no generated positions")
    refused(make(reduce="max"), "from_capture.reduce", "'mean'", "'last'")
    pattern = view["model.layers.0.attention_pattern"]
    refused(make(hook=pattern), "from_capture.hook_id", "attention_pattern", "residual")
    # a capture of another model (another d_model) does not fit this store
    other = VectorStore({**DIMS, "d_model": 32})
    refused(lambda: other.from_capture(resid, reduce="mean", positions="all", capture_id="c", hook_id="h"),
            "from_capture", "length 64", "d_model 32")
    assert len(store) == 0 and len(other) == 0


# ---- llama.cpp control vectors ----

def test_controlvector_import(store, tmp_path):
    directions = {2: RNG.standard_normal(64).astype(np.float32), 1: RNG.standard_normal(64).astype(np.float32)}
    path = write_gguf(tmp_path / "happy.gguf", {"general.architecture": "controlvector",
                                                "controlvector.model_hint": "llama",
                                                "controlvector.layer_count": 2},
                      {f"direction.{n}": v for n, v in directions.items()})
    vecs = store.import_controlvector(path)
    assert [v.layer for v in vecs] == [1, 2]
    assert [v.name for v in vecs] == ["happy.direction.1", "happy.direction.2"]
    for vec in vecs:
        assert vec.data.tobytes() == directions[vec.layer].tobytes()
        assert vec.source == {"kind": "controlvector", "file": "happy.gguf", "direction": vec.layer,
                              "model_hint": "llama"}
        json.dumps(vec.describe())
    named = store.import_controlvector(path.read_bytes(), name="joy")
    assert [v.name for v in named] == ["joy.direction.1", "joy.direction.2"] and named[0].source["file"] is None
    unnamed = store.import_controlvector(path.read_bytes())
    assert unnamed[0].name == "controlvector.direction.1"
    assert len(store) == 6


def test_gguf_writer_and_reader_agree_with_mlx(tmp_path):
    """Our test files are real GGUF: mx.load reads them, and our reader sees the same."""
    import mlx.core as mx

    directions = {1: RNG.standard_normal(64).astype(np.float32), 2: np.arange(64, dtype=np.float32)}
    raw = controlvector_bytes(directions, model_hint="qwen2")
    (tmp_path / "cv.gguf").write_bytes(raw)
    tensors, meta = mx.load(str(tmp_path / "cv.gguf"), return_metadata=True)
    assert meta["general.architecture"] == "controlvector" and meta["controlvector.model_hint"] == "qwen2"
    ours_meta, ours = read_gguf(raw)
    assert ours_meta["general.architecture"] == "controlvector" and ours_meta["controlvector.layer_count"] == 2
    assert set(tensors) == set(ours) == {"direction.1", "direction.2"}
    for name, (ggml_type, shape, blob) in ours.items():
        assert ggml_type == 0 and shape == [64]
        assert np.array_equal(np.array(tensors[name]), np.frombuffer(blob, "<f4"))


def _cv(**extra) -> bytes:
    return controlvector_bytes({1: np.ones(64)}, **extra)


def _patched(raw: bytes, at: int, fmt: str, value) -> bytes:
    out = bytearray(raw)
    out[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(out)


@pytest.mark.parametrize("raw, fragments", [
    (b"hello, not a gguf file at all", ["not a GGUF file"]),
    (b"", ["not a GGUF file"]),
    (gguf_bytes({"general.architecture": "llama"}, {"token_embd.weight": np.ones((4, 64), np.float32)}),
     ["architecture 'llama'", "not 'controlvector'"]),
    (gguf_bytes({"general.name": "x"}, {"direction.1": np.ones(64, np.float32)}), ["no general.architecture"]),
    (controlvector_bytes({1: np.ones(32)}), ["n_embd 32", "d_model is 64", "made for 'llama'"]),
    (controlvector_bytes({1: np.ones(64), 3: np.ones(64)}), ["direction.3", "3 layers (0 to 2)"]),
    (controlvector_bytes({0: np.ones(64), 1: np.ones(64)}), ["direction.0", "start at 1"]),
    (gguf_bytes({"general.architecture": "controlvector"}, {"direction.1": np.ones(64, np.float16)}),
     ["must be float32", "it is float16"]),
    (gguf_bytes({"general.architecture": "controlvector"}, {"direction.1": np.ones((2, 64), np.float32)}),
     ["one dimension"]),
    (gguf_bytes({"general.architecture": "controlvector"}, {"bias.1": np.ones(64, np.float32)}),
     ["'bias.1'", "direction.N"]),
    (gguf_bytes({"general.architecture": "controlvector"}, {}), ["no direction.N tensors"]),
    (controlvector_bytes({1: [np.nan] + [0.0] * 63}), ["non-finite"]),
    (_cv()[:-100], ["extends past the end", "truncated"]),
    (_cv()[:40], ["ends early", "truncated"]),
    (gguf_bytes({"general.architecture": "controlvector"}, {"direction.1": np.ones(64, np.float32)}, version=1),
     ["version 1"]),
    (_patched(_cv(), 4, ">I", 3), ["big-endian"]),
    # headers that crash mx.load's reader (SIGSEGV) must be a plain error here
    (_patched(_cv(), 16, "<Q", 2**40), ["not a valid GGUF file"]),  # metadata count
    (_patched(_cv(), 24, "<Q", 2**40), ["truncated"]),  # first key's length
    (_patched(_cv(), 8, "<Q", 2**40), ["truncated"]),  # tensor count
    (gguf_bytes({"general.architecture": "controlvector", "general.alignment": 24},
                {"direction.1": np.ones(64, np.float32)}), ["power of two"]),
])
def test_bad_controlvectors_are_refused(store, raw, fragments):
    refused(lambda: store.import_controlvector(raw), "controlvector", *fragments)
    assert len(store) == 0


def test_controlvector_bad_name(store):
    refused(lambda: store.import_controlvector(_cv(), name=5), "name", "non-empty string")
    refused(lambda: store.import_controlvector(_cv(), name="x" * 250), "name", "at most 200")
    assert len(store) == 0


def test_controlvector_missing_file(store, tmp_path):
    refused(lambda: store.import_controlvector(tmp_path / "nope.gguf"), "controlvector", "cannot read", "nope.gguf")
