"""Activation capture: every component equals an independent computation, and hooks leave no trace.

The reference is Hugging Face transformers (torch, CPU) loading the SAME weights, run once over
the whole final sequence (prompt + generated tokens) without a KV cache, with torch forward
hooks on the embedding, decoder layers, attention, MLP and norms, and a custom attention
function (registered through transformers' AttentionInterface) that records post-RoPE Q/K/V
and computes masked scaled scores and their softmax. Our capture comes from a cached,
token-by-token MLX generation: prefill (step 0) and one step per token (T_q = 1).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from engine import capture as capture_mod
from engine.capture import Capture
from engine.errors import InvalidArgument, UnknownHook
from engine.generate import Completion, generate
from engine.hooks import estimate_bytes, hook_points, hook_specs, resolve_hooks
from engine.params import CaptureOptions, SamplingParams, parse
from engine.plan import plan
from engine.records import to_numpy
from tests.reference import assert_close, assert_unchanged, causal_attention, snapshot, stepwise_logits
from vocabulary import COMPONENT_NAMES as COMPONENTS
from vocabulary import COMPONENTS as VOCABULARY
from vocabulary import TL_BLOCK_HOOKS

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 6
SDPA = ("query", "key", "value", "attention_scores", "attention_pattern")


# --------------------------------------------------------------------------------------------
# The independent reference: transformers (torch) over the full sequence, no cache.
# --------------------------------------------------------------------------------------------
def hf_reference(path, arch: str, token_ids: list[int]) -> dict[str, np.ndarray]:
    """name -> array for the whole sequence. Per layer i: i.resid_pre, i.resid_post, i.attn_in,
    i.attn_out, i.mlp_in, i.mlp_out, i.ln1_out, i.ln2_in, i.ln2_out, i.query [H,T,D], i.key,
    i.value [KV,T,D], i.scores, i.pattern [H,T,T], i.z [H,T,D] (the output projection's input, per
    head), i.post [T,d_mlp] (the MLP's down projection's input); globals: embed, lnf_in, lnf_out, logits."""
    import torch
    import transformers
    from transformers import AttentionInterface

    ref: dict[str, np.ndarray] = {}

    def keep(name, t):
        ref[name] = t.detach().to(torch.float32).numpy().copy()

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        i = module.layer_idx
        scores, pattern, out = causal_attention(query, key, value, scaling)
        for name, t in (("query", query), ("key", key), ("value", value), ("scores", scores), ("pattern", pattern)):
            keep(f"{i}.{name}", t[0])
        return out.transpose(1, 2).contiguous(), pattern

    AttentionInterface.register("nsbridge_reference", attention)
    cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(path), attn_implementation="nsbridge_reference", dtype=torch.float32).eval()

    def tap(module, name_in, name_out):
        def hook(_mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            if name_in:
                keep(name_in, x[0])
            if name_out:
                keep(name_out, out[0])

        module.register_forward_hook(hook, with_kwargs=True)

    def tap_input(module, name, n_heads=None):
        def hook(_mod, args):
            x = args[0][0]
            keep(name, x if n_heads is None else x.reshape(x.shape[0], n_heads, -1).transpose(0, 1))

        module.register_forward_pre_hook(hook)

    n_heads = model.config.num_attention_heads if arch != "gpt2" else model.config.n_head
    if arch != "gpt2":  # the llama layout: llama, qwen2, qwen3
        inner = model.model
        tap(inner.embed_tokens, None, "embed")
        tap(inner.norm, "lnf_in", "lnf_out")
        for i, layer in enumerate(inner.layers):
            tap(layer, f"{i}.resid_pre", f"{i}.resid_post")
            tap(layer.self_attn, f"{i}.attn_in", f"{i}.attn_out")
            tap(layer.mlp, f"{i}.mlp_in", f"{i}.mlp_out")
            tap(layer.input_layernorm, None, f"{i}.ln1_out")
            tap(layer.post_attention_layernorm, f"{i}.ln2_in", f"{i}.ln2_out")
            tap_input(layer.self_attn.o_proj, f"{i}.z", n_heads)
            tap_input(layer.mlp.down_proj, f"{i}.post")
    else:
        inner = model.transformer
        tap(inner.wte, None, "embed")  # token embedding only; wpe is added after it
        tap(inner.ln_f, "lnf_in", "lnf_out")
        for i, block in enumerate(inner.h):
            tap(block, f"{i}.resid_pre", f"{i}.resid_post")
            tap(block.attn, f"{i}.attn_in", f"{i}.attn_out")
            tap(block.mlp, f"{i}.mlp_in", f"{i}.mlp_out")
            tap(block.ln_1, None, f"{i}.ln1_out")
            tap(block.ln_2, f"{i}.ln2_in", f"{i}.ln2_out")
            tap_input(block.attn.c_proj, f"{i}.z", n_heads)
            tap_input(block.mlp.c_proj, f"{i}.post")
    with torch.no_grad():
        logits = model(torch.tensor([token_ids]), use_cache=False).logits
    keep("logits", logits[0])
    return ref


# --------------------------------------------------------------------------------------------
# What we capture: every component on all layers, plus every input variant.
# --------------------------------------------------------------------------------------------
def layer_name(arch: str, i: int) -> str:
    return f"model.layers.{i}" if arch != "gpt2" else f"transformer.h.{i}"


def full_specs(arch: str, n_layers: int) -> tuple[list[dict], dict[tuple[str, bool], str]]:
    """Hook specs and, for each (hook_id, is_input), the reference tensor it must equal."""
    specs: list[dict] = []
    ref_of: dict[tuple[str, bool], str] = {}

    def add(spec, out_ref=None, in_ref=None):
        if "component" not in spec:  # a TransformerLens name fixes the direction itself
            specs.append(spec)
            ref_of[(spec["hook_id"], False)] = ref_of[(spec["hook_id"], True)] = out_ref
            return
        spec = {**spec, "capture_output": out_ref is not None, "capture_input": in_ref is not None}
        specs.append(spec)
        if out_ref:
            ref_of[(spec["hook_id"], False)] = out_ref
        if in_ref:
            ref_of[(spec["hook_id"], True)] = in_ref

    embed_name = "model.embed_tokens" if arch != "gpt2" else "transformer.wte"
    norm_name = "model.norm" if arch != "gpt2" else "transformer.ln_f"
    add({"hook_id": "embed", "layer_name": embed_name, "component": "embedding"}, "embed")
    add({"hook_id": "final_norm", "layer_name": norm_name, "component": "layernorm"}, "lnf_out", "lnf_in")
    add({"hook_id": "ln_final", "layer_name": "ln_final.hook_normalized"}, "lnf_out")
    for i in range(n_layers):
        name = layer_name(arch, i)
        ln2 = f"{name}.post_attention_layernorm" if arch != "gpt2" else f"{name}.ln_2"
        add({"hook_id": f"{i}.residual", "layer_name": name, "component": "residual"},
            f"{i}.resid_post", f"{i}.resid_pre")
        add({"hook_id": f"{i}.attention", "layer_name": name, "component": "attention"},
            f"{i}.attn_out", f"{i}.attn_in")
        add({"hook_id": f"{i}.mlp", "layer_name": name, "component": "mlp"}, f"{i}.mlp_out", f"{i}.mlp_in")
        add({"hook_id": f"{i}.layernorm", "layer_name": name, "component": "layernorm"},
            f"{i}.ln1_out", f"{i}.resid_pre")
        add({"hook_id": f"{i}.ln2", "layer_name": ln2, "component": "layernorm"}, f"{i}.ln2_out", f"{i}.ln2_in")
        add({"hook_id": f"{i}.resid_mid", "layer_name": f"blocks.{i}.hook_resid_mid"}, f"{i}.ln2_in")
        add({"hook_id": f"{i}.embedding", "layer_name": name, "component": "embedding"}, "embed")
        for comp, ref in (("query", "query"), ("key", "key"), ("value", "value"),
                          ("attention_scores", "scores"), ("attention_pattern", "pattern"),
                          ("head_output", "z"), ("mlp_activation", "post")):
            add({"hook_id": f"{i}.{comp}", "layer_name": name, "component": comp}, f"{i}.{ref}")
    return specs, ref_of


def reference_slice(ref: np.ndarray, component: str, start: int, n: int) -> np.ndarray:
    if component in ("attention_scores", "attention_pattern"):
        return ref[:, start:start + n, :start + n]
    if VOCABULARY[component].token_axis == 1:
        return ref[:, start:start + n]
    return ref[start:start + n]


@dataclass
class Run:
    arch: str
    lm: object
    path: object
    prompt: list[int]
    generation: Completion
    events: list
    capture: Capture
    ref_of: dict
    ref: dict
    plain_tokens: list[int]


def greedy(max_tokens: int, **sampling) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)


def capture_run(lm, prompt, specs, max_tokens=MAX_TOKENS, options=CaptureOptions(), **sampling):
    """-> (the capture, the completion, the events) of a greedy generation capturing `specs`."""
    events = list(generate(plan(lm, prompt=prompt, sampling=greedy(max_tokens, **sampling), hooks=specs,
                                capture=options)))
    assert all(e.capture is events[-1].capture for e in events)
    return events[-1].capture, events[-1].result, events


def capture_of(lm, specs, options=CaptureOptions()) -> Capture:
    return Capture(lm, resolve_hooks(lm, hook_specs(specs)), options)


def plain_tokens(lm, prompt, max_tokens=MAX_TOKENS) -> list[int]:
    return [e.token for e in generate(plan(lm, prompt=prompt, sampling=greedy(max_tokens)))]


def make_run(arch, lm, path) -> Run:
    prompt = lm.chat_prompt(PROMPT)
    specs, ref_of = full_specs(arch, lm.info.n_layers)
    capture, generation, events = capture_run(lm, prompt, specs)
    ref = hf_reference(path, arch, generation.token_ids)
    return Run(arch, lm, path, prompt, generation, events, capture, ref_of, ref, plain_tokens(lm, prompt))


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2", "qwen3"])
def run(request) -> Run:
    arch = request.param
    lm = request.getfixturevalue(f"tiny_{arch}")
    path = request.getfixturevalue(f"tiny_{arch}_path")
    return make_run(arch, lm, path)


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def check_fidelity(run: Run, components, tol: float) -> int:
    checked = 0
    for rec in run.capture.records:
        if rec.component not in components:
            continue
        want_all = run.ref[run.ref_of[(rec.hook_id, rec.is_input)]]
        assert rec.steps, f"{rec.hook_id}: nothing captured"
        for st in rec.steps:
            got = np.array(st.array)
            want = reference_slice(want_all, rec.component, st.start, st.n_tokens)
            assert_close(got, want, tol, f"{run.arch} {rec.hook_id} (input={rec.is_input}) step {st.step}")
            checked += 1
    return checked


# --------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------
# The router exists on mixture-of-experts models only: tests/test_architectures.py verifies it on the zoo's.
@pytest.mark.parametrize("component", [c for c in COMPONENTS if c != "router"])
def test_component_equals_transformers(run, component):
    """Every captured step (prefill and each cached decode step) equals the no-cache torch reference."""
    assert run.generation.finish_reason == "length" and run.generation.completion_tokens == MAX_TOKENS
    assert check_fidelity(run, [component], tol=1e-4) >= MAX_TOKENS + 1


def test_reference_logits_agree(run):
    """The HF reference really runs the same model: full-sequence logits agree with MLX's."""
    logits = run.lm.model(mx.array(run.generation.token_ids)[None])[0]
    assert_close(np.array(logits), run.ref["logits"], 1e-4, "logits")


def test_gpt2_embedding_is_token_embedding_only(tiny_gpt2):
    """GPT-2's `embedding` is wte(tokens); block 0's input adds the position embedding."""
    prompt = tiny_gpt2.chat_prompt(PROMPT)
    cap, gen, _ = capture_run(tiny_gpt2, prompt, [
        {"hook_id": "e", "layer_name": "transformer.wte", "component": "embedding"},
        {"hook_id": "r", "layer_name": "blocks.0.hook_resid_pre"},
    ], max_tokens=2)
    inner = tiny_gpt2.model.model
    ids = mx.array(gen.token_ids)
    wte, wpe = np.array(inner.wte.weight[ids]), np.array(inner.wpe.weight[mx.arange(len(gen.token_ids))])
    emb = np.concatenate([np.array(s.array) for s in cap.records[0].steps])
    pre = np.concatenate([np.array(s.array) for s in cap.records[1].steps])
    np.testing.assert_array_equal(emb, wte)
    np.testing.assert_allclose(pre, wte + wpe, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Structure of what is captured
# --------------------------------------------------------------------------------------------
def test_steps_in_order_and_cover_every_position_once(run):
    total = len(run.generation.token_ids)
    for rec in run.capture.records:
        assert [s.step for s in rec.steps] == list(range(len(rec.steps))), rec.hook_id
        covered = []
        for s in rec.steps:
            covered.extend(range(s.start, s.start + s.n_tokens))
        assert covered == list(range(total)), f"{rec.hook_id}: positions {covered}"
        assert rec.steps[0].n_tokens == len(run.prompt)


def test_decode_steps_have_one_query_and_all_keys(run):
    info = run.lm.info
    for rec in run.capture.records:
        for s in rec.steps[1:]:
            shape = s.array.shape
            assert s.n_tokens == 1, rec.hook_id
            if rec.component in ("attention_scores", "attention_pattern"):
                assert shape == (info.n_heads, 1, s.start + 1), (rec.hook_id, shape)
            elif rec.component in ("query", "head_output"):
                assert shape == (info.n_heads, 1, info.d_head)
            elif rec.component in ("key", "value"):
                assert shape == (info.n_kv_heads, 1, info.d_head)
            elif rec.component == "mlp_activation":
                assert shape == (1, info.d_mlp)
            else:
                assert shape == (1, info.d_model)


def test_patterns_are_causal_rows_summing_to_one(run):
    for rec in run.capture.records:
        if rec.component not in ("attention_pattern", "attention_scores"):
            continue
        for s in rec.steps:
            a = np.array(s.array)
            t_q, t_k = a.shape[1:]
            above = np.arange(t_k)[None, :] > (t_k - t_q + np.arange(t_q))[:, None]  # future keys
            if rec.component == "attention_pattern":
                np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
                assert (a >= 0).all() and (a[:, above] == 0).all()
            else:
                assert np.isneginf(a[:, above]).all() and np.isfinite(a[:, ~above]).all()


def test_generation_identical_with_and_without_capture(run):
    assert [e.token for e in run.events] == run.plain_tokens
    assert run.generation.token_ids[len(run.prompt):] == run.plain_tokens


def test_logits_bit_identical_with_and_without_capture(tiny):
    prompt = tiny.chat_prompt(PROMPT)
    plain = stepwise_logits(tiny, prompt, 5)
    specs, _ = full_specs(tiny.info.architecture, tiny.info.n_layers)
    capture = capture_of(tiny, specs)
    with capture.installed(tiny):
        captured = stepwise_logits(tiny, prompt, 5, capture)
    assert sum(len(r.steps) for r in capture.records) > 0
    for a, b in zip(plain, captured):
        assert np.array_equal(a, b)


def test_name_vocabularies_resolve_to_the_same_tensor(tiny):
    other = "model.layers" if tiny.info.architecture == "gpt2" else "model.h"
    groups = {
        "resid": [("model.layers.1", "residual"), ("transformer.h.1", "residual"), ("blocks.1.hook_resid_post", None),
                  ("h.1", "residual"), (f"{other}.1", "residual")],
        "pattern": [("model.layers.1.self_attn", "attention_pattern"), ("transformer.h.1.attn", "attention_pattern"),
                    ("blocks.1.attn.hook_pattern", None), ("transformer.h.1", "attention_pattern")],
        "q": [("blocks.2.attn.hook_q", None), ("model.layers.2", "query")],
        "attn": [("blocks.0.hook_attn_out", None), ("transformer.h.0", "attention"),
                 ("model.layers.0.self_attn", "attention")],
        "mlp": [("blocks.0.hook_mlp_out", None), ("transformer.h.0.mlp", "mlp")],
        "ln1": [("blocks.2.ln1.hook_normalized", None), ("transformer.h.2.ln_1", "layernorm"),
                ("model.layers.2.input_layernorm", "layernorm"), ("model.layers.2", "layernorm")],
        "ln2": [("blocks.2.ln2.hook_normalized", None), ("transformer.h.2.ln_2", "layernorm"),
                ("model.layers.2.post_attention_layernorm", "layernorm")],
        "embed": [("hook_embed", None), ("transformer.wte", "embedding"), ("model.embed_tokens", "embedding"),
                  ("transformer.h.2", "embedding")],
        "final": [("ln_final.hook_normalized", None), ("transformer.ln_f", "layernorm"), ("model.norm", "layernorm")],
    }
    specs = [
        {"hook_id": f"{g}/{n}", "layer_name": name, **({"component": comp} if comp else {})}
        for g, names in groups.items() for n, (name, comp) in enumerate(names)
    ]
    cap, _, _ = capture_run(tiny, tiny.chat_prompt(PROMPT), specs, max_tokens=3)
    by_group: dict[str, list] = {}
    for rec in cap.records:
        by_group.setdefault(rec.hook_id.split("/")[0], []).append(rec)
    for g, recs in by_group.items():
        first = recs[0]
        for rec in recs[1:]:
            assert len(rec.steps) == len(first.steps) and rec.component == first.component, (g, rec.layer_name)
            for a, b in zip(first.steps, rec.steps):
                assert np.array_equal(np.array(a.array), np.array(b.array)), (g, rec.layer_name)
    assert {r.module_path for r in by_group["resid"]} == {tiny.arch.module_path("block", 1)}


# --------------------------------------------------------------------------------------------
# Options: positions and dtype
# --------------------------------------------------------------------------------------------
def _arrays(cap) -> dict:
    return {(r.hook_id, r.is_input): r for r in cap.records}


def test_positions_last_gives_last_token_of_each_step(run):
    specs, _ = full_specs(run.arch, run.lm.info.n_layers)
    cap, gen, _ = capture_run(run.lm, run.prompt, specs, options=CaptureOptions(positions="last"))
    assert gen.token_ids == run.generation.token_ids
    full = _arrays(run.capture)
    for rec in cap.records:
        ref = full[(rec.hook_id, rec.is_input)]
        assert len(rec.steps) == len(ref.steps)
        for s, r in zip(rec.steps, ref.steps):
            assert s.n_tokens == 1 and s.start == r.start + r.n_tokens - 1
            want = np.take(np.array(r.array), [-1], axis=rec.token_axis)
            assert np.array_equal(np.array(s.array), want), rec.hook_id


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_prompt_or_generated(run, positions):
    specs = [{"hook_id": "r", "layer_name": layer_name(run.arch, 1), "component": "residual"},
             {"hook_id": "p", "layer_name": layer_name(run.arch, 1), "component": "attention_pattern"}]
    cap, _, _ = capture_run(run.lm, run.prompt, specs, options=CaptureOptions(positions=positions))
    full = _arrays(run.capture)
    for rec, ref_id in zip(cap.records, ("1.residual", "1.attention_pattern")):
        ref = full[(ref_id, False)]
        want = ref.steps[:1] if positions == "prompt" else ref.steps[1:]
        assert [s.step for s in rec.steps] == [s.step for s in want]
        for s, r in zip(rec.steps, want):
            assert s.start == r.start and np.array_equal(np.array(s.array), np.array(r.array))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_the_float32_capture_cast(run, dtype):
    specs, _ = full_specs(run.arch, run.lm.info.n_layers)
    cap, gen, _ = capture_run(run.lm, run.prompt, specs, options=CaptureOptions(dtype=dtype))
    assert gen.token_ids == run.generation.token_ids  # capture in another dtype changes nothing
    full = _arrays(run.capture)
    target = getattr(mx, dtype)
    for rec in cap.records:
        assert rec.dtype == dtype
        for s, r in zip(rec.steps, full[(rec.hook_id, rec.is_input)].steps):
            assert s.array.dtype == target
            got = to_numpy(s.array)
            assert got.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)
            assert np.array_equal(got, to_numpy(r.array.astype(target))), rec.hook_id


def test_capture_options_validation():
    assert parse(CaptureOptions, None, positions=None, dtype=None) == CaptureOptions(positions="all", dtype="float32")
    with pytest.raises(InvalidArgument, match="positions") as info:
        parse(CaptureOptions, None, positions="first")
    assert info.value.arg == "positions"
    with pytest.raises(InvalidArgument, match="dtype") as info:
        parse(CaptureOptions, None, dtype="int8")
    assert info.value.arg == "dtype"


# --------------------------------------------------------------------------------------------
# Hooks leave no trace
# --------------------------------------------------------------------------------------------
def _all_specs(lm):
    return full_specs(lm.info.architecture, lm.info.n_layers)[0]


def test_model_unchanged_after_a_request(tiny):
    before = snapshot(tiny)
    prompt = tiny.chat_prompt(PROMPT)
    plain_before = plain_tokens(tiny, prompt)
    capture_run(tiny, prompt, _all_specs(tiny))
    assert_unchanged(tiny, before)
    assert plain_tokens(tiny, prompt) == plain_before


def test_hooks_are_installed_only_during_generation(tiny):
    from mlx_lm.models import base

    before = snapshot(tiny)
    events = generate(plan(tiny, prompt=tiny.chat_prompt(PROMPT), sampling=greedy(5), hooks=_all_specs(tiny)))
    capture = next(events).capture
    seam = sys.modules[type(tiny.model).__module__].scaled_dot_product_attention
    assert seam is not base.scaled_dot_product_attention
    assert any(type(m) in capture_mod._tapped_classes.values() for m in tiny.model.modules())
    events.close()  # the client went away after one token
    assert_unchanged(tiny, before)
    # A later request does not feed the closed capture.
    counts = [len(r.steps) for r in capture.records]
    plain_tokens(tiny, tiny.chat_prompt(PROMPT))
    capture_run(tiny, tiny.chat_prompt(PROMPT), [{"layer_name": "blocks.0.hook_resid_post"}])
    assert [len(r.steps) for r in capture.records] == counts


def test_exception_inside_a_hook_restores_everything(tiny, monkeypatch):
    before = snapshot(tiny)
    keep = Capture._keep

    def failing_keep(self, rec, array, axis):
        if self._step == 2:
            raise RuntimeError("boom")
        keep(self, rec, array, axis)

    monkeypatch.setattr(Capture, "_keep", failing_keep)
    with pytest.raises(RuntimeError, match="boom"):
        list(generate(plan(tiny, prompt=tiny.chat_prompt(PROMPT), sampling=greedy(5), hooks=_all_specs(tiny))))
    assert_unchanged(tiny, before)


def test_exception_thrown_into_generation_restores_everything(tiny):
    before = snapshot(tiny)
    events = generate(plan(tiny, prompt=tiny.chat_prompt(PROMPT), sampling=greedy(5), hooks=_all_specs(tiny)))
    next(events)
    with pytest.raises(KeyboardInterrupt):
        events.throw(KeyboardInterrupt())
    assert_unchanged(tiny, before)


def test_second_capture_waits_for_the_first(tiny_llama):
    lm, prompt = tiny_llama, tiny_llama.chat_prompt(PROMPT)
    events = generate(plan(lm, prompt=prompt, sampling=greedy(4), hooks=[{"layer_name": "blocks.0.hook_resid_post"}]))
    first = next(events).capture
    n_first = len(first.records[0].steps)
    second: dict = {}

    def other():
        cap, gen, _ = capture_run(lm, prompt, [{"layer_name": "blocks.1.hook_resid_post"}], max_tokens=3)
        second.update(cap=cap, gen=gen)

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.3)
    assert not second and len(first.records[0].steps) == n_first  # waiting, and not feeding the first
    rest = list(events)
    thread.join(30)
    assert second and len(second["cap"].records) == 1
    assert len(second["cap"].records[0].steps) == 1 + 3
    assert len(first.records[0].steps) == 1 + 4 and rest[-1].finish_reason == "length"


# --------------------------------------------------------------------------------------------
# Resolution errors, hook listing, size estimate
# --------------------------------------------------------------------------------------------
ERRORS = [  # (id, hooks, error class, the argument it names, needles in its message)
    ("not-a-list", {"layer_name": "model.layers.0"}, InvalidArgument, "hooks", ["must be a list"]),
    ("not-an-object", ["model.layers.0"], InvalidArgument, "hooks[0]", ["must be an object"]),
    ("no-layer-name", [{"component": "residual"}], InvalidArgument, "hooks[0].layer_name", ["layer_name"]),
    ("unknown-layer", [{"layer_name": "model.layers.3", "component": "residual"}], UnknownHook,
     "hooks[0].layer_name", ["3 layers", "0 to 2"]),
    ("unknown-layer-tl", [{"layer_name": "blocks.7.hook_resid_post"}], UnknownHook, "hooks[0].layer_name",
     ["0 to 2"]),
    ("unknown-component", [{"layer_name": "model.layers.0", "component": "resid"}], InvalidArgument,
     "hooks[0].component", list(COMPONENTS)),
    ("unknown-name", [{"layer_name": "decoder.block0", "component": "residual"}], UnknownHook, "hooks[0].layer_name",
     ["model.layers.N", "transformer.h.N", "blocks.N.hook_resid_pre", "hook_pattern", "hook_embed"]),
    ("unknown-submodule", [{"layer_name": "model.layers.0.feed_forward", "component": "mlp"}], UnknownHook,
     "hooks[0].layer_name", ["feed_forward", "model.layers.N"]),
    ("unknown-tl-hook", [{"layer_name": "blocks.0.hook_resid_postt"}], UnknownHook, "hooks[0].layer_name",
     ["hook_resid_postt", "blocks.N.hook_resid_pre"]),
    ("missing-component", [{"layer_name": "model.layers.0"}], InvalidArgument, "hooks[0].component",
     ["needs a 'component'", "residual"]),
    ("tl-vs-component", [{"layer_name": "blocks.0.hook_resid_post", "component": "mlp"}], UnknownHook,
     "hooks[0].component", ["'residual'", "'mlp'"]),
    ("global-vs-component", [{"layer_name": "transformer.wte", "component": "residual"}], UnknownHook,
     "hooks[0].component", ["'embedding'"]),
    ("submodule-vs-component", [{"layer_name": "model.layers.0.mlp", "component": "attention"}], UnknownHook,
     "hooks[0].component", ["not part of", "mlp"]),
    ("input-of-query", [{"layer_name": "model.layers.0", "component": "query", "capture_input": True}],
     InvalidArgument, "hooks[0].capture_input", ["no input tensor"]),
    ("input-of-pattern", [{"layer_name": "model.layers.0", "component": "attention_pattern",
                           "capture_input": True, "capture_output": False}], InvalidArgument, "hooks[0].capture_input",
     ["no input tensor"]),
    ("input-of-embedding", [{"layer_name": "transformer.wte", "component": "embedding", "capture_input": True}],
     InvalidArgument, "hooks[0].capture_input", ["no input tensor"]),
    ("input-of-tl-name", [{"layer_name": "blocks.0.hook_resid_post", "capture_input": True}], InvalidArgument,
     "hooks[0].capture_input", ["capture_input does not apply"]),
    ("duplicate-id", [{"hook_id": "x", "layer_name": "model.layers.0", "component": "residual"},
                      {"hook_id": "x", "layer_name": "model.layers.1", "component": "residual"}], InvalidArgument,
     "hooks[1].hook_id", ["used twice"]),
    ("duplicate-default-id", [{"layer_name": "blocks.0.hook_resid_post"}, {"layer_name": "blocks.0.hook_resid_post"}],
     InvalidArgument, "hooks[1].hook_id", ["used twice"]),
    ("nothing", [{"layer_name": "model.layers.0", "component": "residual", "capture_output": False}],
     InvalidArgument, "hooks[0].capture_output", ["captures nothing"]),
    ("non-bool-flag", [{"layer_name": "model.layers.0", "component": "residual", "capture_input": "yes"}],
     InvalidArgument, "hooks[0].capture_input", ["boolean"]),
    ("non-string-id", [{"hook_id": 5, "layer_name": "model.layers.0", "component": "residual"}], InvalidArgument,
     "hooks[0].hook_id", ["hook_id"]),
]


@pytest.mark.parametrize("specs,exc,arg,needles", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_resolve_hooks_errors(tiny, specs, exc, arg, needles):
    with pytest.raises(exc) as info:
        resolve_hooks(tiny, hook_specs(specs))
    for needle in needles:
        assert needle in info.value.message, (needle, info.value.message)
    assert info.value.arg == arg
    with pytest.raises(exc) as info:  # the same through a plan
        plan(tiny, prompt=[5, 6], hooks=specs)
    assert info.value.arg == arg


def test_resolve_defaults(tiny_llama):
    """The output comes first, so that shared memory and Completion.activations name the input `<id>:input`."""
    t = resolve_hooks(tiny_llama, hook_specs([{"layer_name": "model.layers.1", "component": "mlp",
                                               "capture_input": True}]))
    assert [(x.hook_id, x.is_input, x.site, x.layer) for x in t] == [
        ("model.layers.1.mlp", False, "mlp", 1), ("model.layers.1.mlp", True, "mlp", 1)]
    assert resolve_hooks(tiny_llama, []) == []


def test_hook_points_list_every_point_with_its_shape(tiny):
    info = tiny.info
    points = hook_points(tiny)
    assert len(points) == 2 + (len(TL_BLOCK_HOOKS) - 1) * info.n_layers  # dense: every point but the router
    names = [p["name"] for p in points]
    assert len(set(names)) == len(names)
    # Every listed point resolves by name, and a capture of all of them has the listed shapes.
    targets = resolve_hooks(tiny, hook_specs([{"layer_name": n} for n in names]))
    assert [(t.component, t.is_input, t.layer) for t in targets] == [
        (p["component"], p["is_input"], p["layer"]) for p in points]
    assert all(p["layer_index"] == p["layer"] for p in points)
    cap, _, _ = capture_run(tiny, tiny.chat_prompt(PROMPT), [{"layer_name": n} for n in names], max_tokens=2)
    for p, rec in zip(points, cap.records):
        assert rec.module_path == p["module_path"]
        for s in rec.steps:
            shape = list(s.array.shape)
            del shape[rec.token_axis]
            if p["shape_per_token"][-1] == -1:
                shape[-1] = -1
            assert shape == p["shape_per_token"], (p["name"], shape)
    by_comp = {p["component"] for p in points}
    assert by_comp == set(COMPONENTS) - {"router"}


@pytest.mark.parametrize("positions,dtype", [("all", "float32"), ("last", "float16"), ("prompt", "float32"),
                                             ("generated", "bfloat16")])
def test_estimate_bytes_bounds_a_full_run(tiny, positions, dtype):
    prompt = tiny.chat_prompt(PROMPT)
    options = CaptureOptions(positions=positions, dtype=dtype)
    specs = _all_specs(tiny)
    cap, gen, _ = capture_run(tiny, prompt, specs, max_tokens=5, options=options)
    assert gen.finish_reason == "length"
    real = sum(s.array.nbytes for r in cap.records for s in r.steps)
    est = estimate_bytes(tiny, resolve_hooks(tiny, hook_specs(specs)), len(prompt), 5, options)
    assert real <= est
    assert est == real  # a run that reaches max_tokens needs exactly the estimate


# --------------------------------------------------------------------------------------------
# The real model (slow)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_all_components_equal_transformers(default_model, default_model_path):
    lm = default_model
    prompt = lm.chat_prompt(PROMPT)
    specs, ref_of = full_specs("llama", lm.info.n_layers)
    capture, generation, events = capture_run(lm, prompt, specs, max_tokens=4)
    assert [e.token for e in events] == plain_tokens(lm, prompt, 4)
    ref = hf_reference(default_model_path, "llama", generation.token_ids)
    run = Run("llama", lm, default_model_path, prompt, generation, events, capture, ref_of, ref, [])
    assert check_fidelity(run, COMPONENTS, tol=1e-4) > 0  # measured: <= 7e-6


@pytest.mark.slow
def test_real_model_logits_bit_identical_with_capture(default_model):
    lm = default_model
    prompt = lm.chat_prompt(PROMPT)
    plain = stepwise_logits(lm, prompt, 3)
    capture = capture_of(lm, full_specs("llama", lm.info.n_layers)[0])
    with capture.installed(lm):
        captured = stepwise_logits(lm, prompt, 3, capture)
    assert all(np.array_equal(a, b) for a, b in zip(plain, captured))
