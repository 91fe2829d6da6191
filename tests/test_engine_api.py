"""The engine's public API (engine.load, engine.Model), plans and streaming text.

Fast tests use the tiny random llama and gpt2 models; `slow` ones the real SmolLM2-135M and
the example script examples/engine_api.py.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import engine
import mlx.core as mx
import numpy as np
import pytest

import vocabulary

from engine import capture as capture_mod
from engine.api import Model
from engine.capture import Capture
from engine.detokenize import ByteLevelDetokenizer
from engine.errors import CaptureTooLarge, ContextLengthExceeded, InvalidArgument, UnknownHook
from engine.generate import Completion, TokenEvent, VisibleText
from engine.hooks import estimate_bytes, hook_specs, resolve_hooks
from engine.params import CaptureOptions, HookSpec, SamplingParams
from engine.plan import GenerationPlan

ROOT = Path(__file__).resolve().parent.parent
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture
def model(tiny) -> Model:
    return Model(tiny)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def test_load_a_folder(tiny_llama_path):
    m = engine.load(str(tiny_llama_path))
    assert isinstance(m, engine.Model) and m.info.model_id == "tiny-llama" and m.info.n_layers == 3
    assert engine.load(str(tiny_llama_path), model_id="mine").info.model_id == "mine"
    assert "tiny-llama" in repr(m) and m.activation_hooks == []


def test_import_engine_stays_light():
    """`import engine` loads OpenBLAS only; the API (and mlx) come on first use of engine.load/Model."""
    code = ("import sys, engine; assert 'mlx.core' not in sys.modules and 'engine.api' not in sys.modules; "
            "engine.Model; assert 'engine.api' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# --------------------------------------------------------------------------------------------
# Registered hooks
# --------------------------------------------------------------------------------------------
def test_register_and_unregister(model):
    a = model.register_activation_hook(layer_name="transformer.h.1", component="residual")
    b = model.register_activation_hook(layer_name="blocks.2.attn.hook_pattern")
    c = model.register_activation_hook("model.layers.0", "mlp", hook_id="mine", capture_input=True)
    assert (a, b, c) == ("transformer.h.1.residual", "blocks.2.attn.hook_pattern", "mine")
    hooks = model.activation_hooks
    assert all(isinstance(h, HookSpec) for h in hooks) and [h.hook_id for h in hooks] == [a, b, c]
    assert hooks[2].capture_input and hooks[2].component == "mlp"
    model.unregister_activation_hook(b)
    assert [h.hook_id for h in model.activation_hooks] == [a, c]
    with pytest.raises(InvalidArgument) as info:
        model.unregister_activation_hook(b)
    assert info.value.arg == "hook_id" and "'transformer.h.1.residual', 'mine'" in info.value.message
    assert model.clear_activation_hooks() == 2 and model.activation_hooks == [] and model.clear_activation_hooks() == 0


@pytest.mark.parametrize("kwargs,exc,arg,needle", [
    ({"layer_name": "transformer.h.3", "component": "residual"}, UnknownHook, "layer_name", "0 to 2"),
    ({"layer_name": "decoder.block0", "component": "residual"}, UnknownHook, "layer_name", "transformer.h.N"),
    ({"layer_name": "transformer.h.1"}, InvalidArgument, "component", "needs a 'component'"),
    ({"layer_name": "transformer.h.1", "component": "resid"}, UnknownHook, "component", "residual"),
    ({"layer_name": "blocks.1.hook_resid_post", "component": "mlp"}, UnknownHook, "component", "'mlp'"),
    ({"layer_name": "transformer.h.1", "component": "query", "capture_input": True}, InvalidArgument,
     "capture_input", "no input tensor"),
    ({"layer_name": "transformer.h.1", "component": "residual", "capture_output": False}, InvalidArgument,
     "capture_output", "captures nothing"),
    ({"layer_name": "", "component": "residual"}, InvalidArgument, "layer_name", "layer_name"),
], ids=["layer", "name", "no-component", "component", "disagree", "input", "nothing", "empty"])
def test_register_checks_at_once(model, kwargs, exc, arg, needle):
    with pytest.raises(exc) as info:
        model.register_activation_hook(**kwargs)
    assert type(info.value) is exc and info.value.arg == arg and needle in info.value.message
    assert model.activation_hooks == []


def test_register_refuses_a_registered_id(model):
    model.register_activation_hook("transformer.h.1", "residual", hook_id="x")
    with pytest.raises(InvalidArgument, match="already registered") as info:
        model.register_activation_hook("transformer.h.2", "residual", hook_id="x")
    assert info.value.arg == "hook_id"
    with pytest.raises(InvalidArgument, match="already registered"):
        model.register_activation_hook("blocks.0.hook_resid_post")
        model.register_activation_hook("blocks.0.hook_resid_post")


def test_hook_points(model):
    points = model.hook_points()
    assert len(points) == 2 + (len(vocabulary.TL_BLOCK_HOOKS) - 1) * model.info.n_layers  # dense: no router
    z = next(p for p in points if p["name"] == "blocks.1.attn.hook_z")
    assert z["component"] == "head_output" and z["shape_per_token"] == [model.info.n_heads, model.info.d_head]
    post = next(p for p in points if p["name"] == "blocks.2.mlp.hook_post")
    assert post["component"] == "mlp_activation" and post["shape_per_token"] == [model.info.d_mlp]
    assert post["module_path"].endswith(("mlp.down_proj", "mlp.c_proj")) and post["interventable"] and z["interventable"]
    assert not next(p for p in points if p["name"] == "blocks.1.attn.hook_pattern")["interventable"]
    p = next(p for p in points if p["name"] == "blocks.1.attn.hook_pattern")
    assert p["layer"] == p["layer_index"] == 1 and p["component"] == "attention_pattern" and not p["is_input"]
    assert p["shape_per_token"] == [model.info.n_heads, -1] and p["aliases"][0] == "transformer.h.1"
    assert points[0]["aliases"][0] == "transformer.wte" and points[-1]["aliases"][0] == "transformer.ln_f"
    for p in points:  # every point registers as a hook by its name
        model.register_activation_hook(p["name"])
    assert len(model.activation_hooks) == len(points)


# --------------------------------------------------------------------------------------------
# Generation and activations
# --------------------------------------------------------------------------------------------
def test_generate_without_hooks(model):
    out = model.generate(messages=CHAT, max_tokens=6, temperature=0)
    assert isinstance(out, Completion) and out.capture is None and out.activations == {}
    assert out.prompt_tokens == len(model.lm.chat_prompt(CHAT)) and out.completion_tokens == 6
    assert out.finish_reason == "length" and len(out.token_ids) == len(out.tokens) == out.prompt_tokens + 6
    assert out.model_id == model.info.model_id
    assert out.text == model.lm.tokenizer.decode(out.token_ids[out.prompt_tokens:])
    assert out.tokens == [model.lm.tokenizer.decode([t]) for t in out.token_ids]


def _manual_capture(lm, specs, token_ids, prompt_tokens, options=CaptureOptions()) -> Capture:
    """The same hooks captured by driving the model by hand (not through engine.generate): the
    prompt as one step, then each later token as one step, as the engine's loop does."""
    from mlx_lm.models.cache import make_prompt_cache

    capture = Capture(lm, resolve_hooks(lm, hook_specs(specs)), options)
    cache = make_prompt_cache(lm.model)
    steps = [token_ids[:prompt_tokens]] + [[t] for t in token_ids[prompt_tokens:]]
    with capture.installed(lm):
        start = 0
        for step, tokens in enumerate(steps):
            capture.begin_step(step, start)
            mx.eval(lm.model(mx.array(tokens)[None], cache=cache), *capture.end_step())
            start += len(tokens)
    return capture


def _token_major(record) -> np.ndarray:
    """A record's steps joined by hand: tokens first, attention keys padded with -inf / 0."""
    arrays = [np.array(s.array) for s in record.steps]
    if record.token_axis == 1:
        arrays = [np.moveaxis(a, 1, 0) for a in arrays]
    if record.component in ("attention_scores", "attention_pattern"):
        pad = -np.inf if record.component == "attention_scores" else 0.0
        n = max(a.shape[-1] for a in arrays)
        arrays = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])], constant_values=pad) for a in arrays]
    return np.concatenate(arrays)


SPECS = [
    {"layer_name": "transformer.h.1", "component": "residual", "capture_input": True, "hook_id": "resid1"},
    {"layer_name": "blocks.2.attn.hook_pattern"},
    {"layer_name": "blocks.0.attn.hook_attn_scores"},
    {"layer_name": "model.layers.2", "component": "key"},
    {"layer_name": "hook_embed"},
    {"layer_name": "transformer.ln_f", "component": "layernorm"},
]


def test_activations_equal_the_capture_records(model):
    for spec in SPECS:
        model.register_activation_hook(**spec)
    out = model.generate(messages=CHAT, max_tokens=5, temperature=0)
    assert out.capture is not None and out.capture.capture_id.startswith("cap_")
    assert out.capture.token_ids == out.token_ids and out.capture.tokens == out.tokens
    acts = out.activations
    assert list(acts) == ["resid1", "resid1:input", "blocks.2.attn.hook_pattern", "blocks.0.attn.hook_attn_scores",
                          "model.layers.2.key", "hook_embed", "transformer.ln_f.layernorm"]
    n = len(out.token_ids)
    info = model.info
    assert acts["resid1"].shape == (n, info.d_model) and acts["resid1"].dtype == np.float32
    assert acts["blocks.2.attn.hook_pattern"].shape == (n, info.n_heads, n)
    assert acts["model.layers.2.key"].shape == (n, info.n_kv_heads, info.d_head)
    manual = _manual_capture(model.lm, [h.model_dump() for h in model.activation_hooks], out.token_ids,
                             out.prompt_tokens)
    for name, rec, ref in zip(acts, out.capture.hooks, manual.records):
        assert (rec.hook_id, rec.is_input) == (ref.hook_id, ref.is_input)
        np.testing.assert_array_equal(acts[name], _token_major(rec), err_msg=name)
        np.testing.assert_array_equal(acts[name], _token_major(ref), err_msg=name)  # bit-identical by hand
    # residual input of layer 1 = output of layer 0 (both read from the same tensor)
    out0 = model.generate(messages=CHAT, max_tokens=5, temperature=0,
                          hooks=[{"layer_name": "blocks.0.hook_resid_post"}])
    np.testing.assert_array_equal(out0.activations["blocks.0.hook_resid_post"], acts["resid1:input"])
    assert out0.token_ids == out.token_ids


def test_hooks_argument_overrides_the_registered_ones(model):
    model.register_activation_hook("transformer.h.1", "residual")
    assert set(model.generate(prompt="Hello", max_tokens=2, temperature=0).activations) == {"transformer.h.1.residual"}
    assert model.generate(prompt="Hello", max_tokens=2, temperature=0, hooks=None).capture is None
    assert model.generate(prompt="Hello", max_tokens=2, temperature=0, hooks=[]).capture is None
    out = model.generate(prompt="Hello", max_tokens=2, temperature=0, hooks=[HookSpec(layer_name="hook_embed")])
    assert set(out.activations) == {"hook_embed"}


@pytest.mark.parametrize("positions,dtype", [("last", "float16"), ("prompt", "float32"), ("generated", "bfloat16")])
def test_positions_and_dtype(model, positions, dtype):
    model.register_activation_hook("transformer.h.1", "residual", hook_id="r")
    full = model.generate(messages=CHAT, max_tokens=4, temperature=0)
    out = model.generate(messages=CHAT, max_tokens=4, temperature=0, positions=positions, dtype=dtype)
    assert out.token_ids == full.token_ids
    a, ref = out.activations["r"], full.activations["r"]
    p = out.prompt_tokens
    rows = {"last": [p - 1, p, p + 1, p + 2, p + 3], "prompt": list(range(p)),
            "generated": list(range(p, p + 4))}[positions]
    assert a.dtype == (np.float16 if dtype == "float16" else np.float32) and a.shape == (len(rows), model.info.d_model)
    want = mx.array(ref[rows]).astype(getattr(mx, dtype)).astype(mx.float32)
    np.testing.assert_array_equal(a.astype(np.float32), np.array(want))


def test_stream_events(model):
    model.register_activation_hook("transformer.h.1", "residual", hook_id="r")
    events = list(model.stream(messages=CHAT, max_tokens=6, temperature=0))
    assert all(isinstance(e, TokenEvent) for e in events)
    out = events[-1].result
    assert [e.result for e in events[:-1]] == [None] * 5 and out.finish_reason == events[-1].finish_reason
    assert "".join(e.text for e in events) == out.text
    assert [e.token for e in events] == out.token_ids[out.prompt_tokens:]
    assert [e.step for e in events] == [e.index for e in events] == list(range(6))
    assert all(e.prompt_tokens == out.prompt_tokens for e in events)
    assert all(e.capture is events[0].capture and e.capture is not None for e in events)
    assert out.capture.hooks is events[0].capture.records


def test_live_capture_grows_step_by_step(model):
    """What a streaming consumer sees: at each event, the steps up to the event's own step; the
    last event also has the final token's step."""
    model.register_activation_hook("transformer.h.1", "residual", hook_id="r")
    seen = []
    for e in model.stream(messages=CHAT, max_tokens=4, temperature=0):
        seen.append([s.step for s in e.capture.records[0].steps])
    assert seen == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3, 4]]


def test_closing_a_stream_removes_the_capture(model):
    model.register_activation_hook("blocks.1.attn.hook_pattern")
    events = model.stream(messages=CHAT, max_tokens=8, temperature=0)
    first = next(events)
    assert capture_mod._active is first.capture
    events.close()
    assert capture_mod._active is None and capture_mod._INSTALL_LOCK.acquire(blocking=False)
    capture_mod._INSTALL_LOCK.release()


def test_the_last_event_comes_after_the_capture_is_removed(model):
    model.register_activation_hook("transformer.h.1", "residual")
    for e in model.stream(messages=CHAT, max_tokens=3, temperature=0):
        if e.result is not None:
            assert capture_mod._active is None  # a consumer that stops here leaves nothing installed
            break


def test_a_plan_snapshots_the_registered_hooks(model):
    model.register_activation_hook("transformer.h.1", "residual", hook_id="a")
    events = model.stream(messages=CHAT, max_tokens=3, temperature=0)
    model.register_activation_hook("transformer.h.2", "residual", hook_id="b")
    model.unregister_activation_hook("a")
    assert set(list(events)[-1].result.activations) == {"a"}


def test_run_refuses_a_plan_of_another_model(tiny_llama, tiny_gpt2):
    p = Model(tiny_llama).plan(prompt="Hi")
    with pytest.raises(InvalidArgument) as info:
        Model(tiny_gpt2).run(p)
    assert info.value.arg == "plan"
    m = Model(tiny_llama)
    assert [e.token for e in m.run(m.plan(prompt=[5, 6], sampling=SamplingParams(max_tokens=2, temperature=0)))]


def test_one_generation_at_a_time_from_two_threads(tiny_llama):
    """The server runs `run` on one worker thread; two threads still never mix captures."""
    m = Model(tiny_llama)
    m.register_activation_hook("transformer.h.1", "residual", hook_id="r")
    outs = {}

    def go(name):
        outs[name] = m.generate(messages=CHAT, max_tokens=4, temperature=0)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    np.testing.assert_array_equal(outs[0].activations["r"], outs[1].activations["r"])
    assert len(outs[0].capture.hooks[0].steps) == 5


# --------------------------------------------------------------------------------------------
# Plans: every check that needs the model, with its argument and its numbers
# --------------------------------------------------------------------------------------------
def test_plan_is_resolved_once(model):
    p = model.plan(messages=CHAT, sampling=SamplingParams(max_tokens=4, temperature=0),
                   hooks=[{"layer_name": "blocks.1.hook_resid_post"}], capture=CaptureOptions(positions="last"))
    assert isinstance(p, GenerationPlan) and p.prompt == tuple(model.lm.chat_prompt(CHAT))
    assert p.prompt_tokens == len(p.prompt) and p.max_tokens == 4 and p.capture.positions == "last"
    assert [t.hook_id for t in p.targets] == ["blocks.1.hook_resid_post"]
    assert p.capture_bytes == estimate_bytes(model.lm, list(p.targets), p.prompt_tokens, 4, p.capture) > 0
    assert model.plan(prompt="Hi").targets is None and model.plan(prompt="Hi", hooks=[]).targets is None
    with pytest.raises(AttributeError):
        p.prompt = ()  # frozen


def test_plan_prompts(model):
    tok = model.lm.tokenizer
    assert model.plan(prompt="Hello there").prompt == tuple(tok.encode("Hello there"))
    assert model.plan(prompt=[5, 6, np.int64(7)]).prompt == (5, 6, 7)
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    assert model.plan(messages=parts).prompt == model.plan(messages=CHAT).prompt


def _plan_error(model, exc=InvalidArgument, **kwargs):
    with pytest.raises(exc) as info:
        model.plan(**kwargs)
    assert isinstance(info.value, exc)
    return info.value


def test_plan_errors_prompt(model):
    v = model.info.vocab_size
    assert _plan_error(model, prompt="Hi", messages=CHAT).arg == "prompt"
    assert _plan_error(model).arg == "messages"
    assert _plan_error(model, prompt="").arg == "prompt"
    assert _plan_error(model, prompt=[]).arg == "prompt"
    assert _plan_error(model, prompt={"text": "Hi"}).arg == "prompt"
    err = _plan_error(model, prompt=[5, v, 6])
    assert err.arg == "prompt[1]" and f"token id {v}" in err.message and f"0 to {v - 1}" in err.message
    assert _plan_error(model, prompt=[5, -1]).arg == "prompt[1]"
    assert _plan_error(model, prompt=[5, "6"]).arg == "prompt[1]"
    assert _plan_error(model, prompt=[True]).arg == "prompt[0]"
    assert _plan_error(model, messages=[{"role": "user", "content": None}]).arg == "messages[0].content"
    assert _plan_error(model, messages=[{"role": "wizard", "content": "Hi"}]).arg == "messages[0].role"
    assert _plan_error(model, messages=[]).arg == "messages"


def test_plan_errors_context(model):
    n = model.info.context_length
    err = _plan_error(model, ContextLengthExceeded, prompt=[5] * n)
    assert err.arg == "prompt" and f"maximum context length is {n} tokens" in err.message
    assert f"the prompt has {n} tokens" in err.message
    chat = [{"role": "user", "content": "Hello " * n}]
    p = len(model.lm.chat_prompt(chat))
    err = _plan_error(model, ContextLengthExceeded, messages=chat)
    assert err.arg == "messages" and f"the prompt has {p} tokens" in err.message
    err = _plan_error(model, ContextLengthExceeded, prompt=[5] * 200, sampling=SamplingParams(max_tokens=57))
    assert err.arg == "max_tokens" and err.message == (
        f"this model's maximum context length is {n} tokens; the prompt has 200 tokens and max_tokens asks for 57; "
        f"lower max_tokens to at most {n - 200}")
    assert model.plan(prompt=[5] * 200, sampling=SamplingParams(max_tokens=n - 200)).max_tokens == n - 200
    # Left at its default (256 > what is left), max_tokens becomes what fits.
    assert model.plan(prompt=[5] * 200).max_tokens == n - 200


def test_plan_errors_top_k(model):
    v = model.info.vocab_size
    err = _plan_error(model, prompt="Hi", sampling=SamplingParams(top_k=v + 1))
    assert err.arg == "top_k" and f"top_k is {v + 1}" in err.message and f"has {v} tokens" in err.message
    assert model.plan(prompt="Hi", sampling=SamplingParams(top_k=v)).sampling.top_k == v
    out = model.generate(prompt="Hi", max_tokens=2, top_k=v, temperature=1.0, seed=3)
    assert out.completion_tokens == 2


def test_plan_errors_hooks(model):
    err = _plan_error(model, UnknownHook, prompt="Hi", hooks=[{"layer_name": "blocks.0.hook_resid_post"},
                                                              {"layer_name": "transformer.h.9", "component": "mlp"}])
    assert err.arg == "hooks[1].layer_name" and "0 to 2" in err.message
    assert _plan_error(model, prompt="Hi", hooks=[{"layer_name": "hook_embed", "bogus": 1}]).arg == "hooks[0].bogus"


def test_plan_errors_capture_budget(model):
    hooks = [{"layer_name": f"blocks.{i}.attn.hook_pattern"} for i in range(3)]
    sampling = SamplingParams(max_tokens=40, temperature=0)
    size = model.plan(messages=CHAT, sampling=sampling, hooks=hooks).capture_bytes
    err = _plan_error(model, CaptureTooLarge, messages=CHAT, sampling=sampling, hooks=hooks,
                      capture_budget_bytes=size - 1)
    assert err.arg == "hooks" and f"{size / 2**20:.1f} MiB" in err.message and "budget" in err.message
    assert model.plan(messages=CHAT, sampling=sampling, hooks=hooks, capture_budget_bytes=size).capture_bytes == size
    # The budget counts what was asked: the positions and dtype shrink it.
    small = model.plan(messages=CHAT, sampling=sampling, hooks=hooks, capture=CaptureOptions(positions="last",
                                                                                             dtype="float16"))
    assert small.capture_bytes < size / 2


def test_sampling_arguments_are_checked(model):
    with pytest.raises(InvalidArgument) as info:
        model.generate(prompt="Hi", temperature=-1)
    assert info.value.arg == "temperature"
    with pytest.raises(InvalidArgument) as info:
        model.generate(prompt="Hi", max_token=3)  # a misspelt argument is not ignored
    assert info.value.arg == "max_token"
    with pytest.raises(InvalidArgument) as info:
        model.generate(prompt="Hi", positions="first")
    assert info.value.arg == "positions"


# --------------------------------------------------------------------------------------------
# Streaming text: incremental, exact, linear
# --------------------------------------------------------------------------------------------
def test_detokenizer_equals_decode(tiny):
    """Random token sequences (split characters, invalid UTF-8, special tokens, leading spaces)."""
    tok = tiny.tokenizer
    detok = tiny.detokenizer()
    assert isinstance(detok, ByteLevelDetokenizer)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 25))]
        detok.reset()
        for t in ids:
            detok.add_token(t)
        detok.finalize()
        assert detok.text == tok.decode(ids), ids


def test_multibyte_characters_never_stream_as_halves(tiny):
    tok = tiny.tokenizer
    text = " a日本語b 😀 é"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) - 3  # the tiny vocabulary splits these characters into bytes
    out = VisibleText(tiny.detokenizer(), [])
    pieces = [out.add(t) for t in ids] + [out.finish()]
    assert "".join(pieces) == text and out.text == text and not any("\ufffd" in p for p in pieces)
    assert pieces[0] == " a" or pieces[0] == " "  # the leading space is kept, as decode keeps it


def test_stop_string_inside_multibyte_text(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("a日本語b", add_special_tokens=False)
    out = VisibleText(tiny.detokenizer(), ["本語"])
    pieces = []
    for t in ids:
        pieces.append(out.add(t))
        if out.stopped:
            break
    assert out.stopped and "".join(pieces) == out.text == "a日"


def test_no_quadratic_decode(model, monkeypatch):
    """The text is detokenized incrementally: generation decodes each distinct token once (for
    `tokens`), never the whole completion per token."""
    hf = model.lm.tokenizer._tokenizer
    decoded = []
    real = hf.decode

    def counting(ids, *args, **kwargs):
        decoded.append(len(ids))
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(hf, "decode", counting)
    out = model.generate(messages=CHAT, max_tokens=40, temperature=0)
    assert out.completion_tokens >= 2
    assert set(decoded) <= {1} and len(decoded) == len(set(out.token_ids))


# --------------------------------------------------------------------------------------------
# The real model (slow)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_through_the_api(default_model):
    m = Model(default_model)
    hook = m.register_activation_hook(layer_name="transformer.h.5", component="residual")
    out = m.generate(messages=CHAT, max_tokens=12, temperature=0)
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert out.activations[hook].shape == (len(out.token_ids), 576)
    # A raw prompt's completion keeps its leading space (mlx-lm's own detokenizer drops it).
    done = m.generate(prompt="The capital of France is", max_tokens=4, temperature=0, hooks=None)
    assert done.text.startswith(" ")
    assert done.text == default_model.tokenizer.decode(done.token_ids[done.prompt_tokens:])


@pytest.mark.slow
def test_default_model_streams_multibyte_text_whole(default_model):
    m = Model(default_model)
    events = list(m.stream(messages=[{"role": "user", "content": "Write three Japanese words in kanji, no romaji."}],
                           max_tokens=24, temperature=0))
    out = events[-1].result
    assert not any("\ufffd" in e.text for e in events[:-1]) and "".join(e.text for e in events) == out.text
    assert any(ord(c) > 0x2E80 for c in out.text)  # it did write CJK characters (split into byte tokens)
    # Cut by max_tokens inside a character, the text ends as decode ends it (U+FFFD), never earlier.
    assert out.text == default_model.tokenizer.decode(out.token_ids[out.prompt_tokens:])


@pytest.mark.slow
def test_example_engine_api():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "engine_api.py")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "smollm2-135m-instruct" in out and "Paris" in out
    assert "transformer.h.5.residual: shape (" in out and ", 576), float32" in out
    assert out.rstrip().endswith("ENGINE API OK")
