"""Log-probabilities: OpenAI's `logprobs`/`top_logprobs` and the `logprob_token_ids` extension.

The reference is Hugging Face transformers (torch, CPU, float32) loading the SAME tiny model
folder and computing log_softmax over prompt + generated ids in one forward without a cache;
ours come from the cached, token-by-token MLX generation. Then the HTTP forms: both chat
endpoints, streamed and not (the same entries, one per generated token, none lost), the
`openai` package parsing them, 400s naming the field, and nothing changed when not asked.
"""

from __future__ import annotations

import functools

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import numpy as np
import pytest
import requests

from engine.api import Model
from engine.errors import InvalidArgument
from engine.params import LogprobOptions
from engine.plan import prompt_ids
from tests.test_server import PROMPT, assert_error, chat_body, sse_events

CHAT = "/v1/chat/completions"
ACT = "/v1/chat/completions/with_activations"
HOOK = [{"layer_name": "transformer.h.0", "component": "residual"}]
TOL = 1e-4
MAX_TOKENS = 5


# --- the independent reference ----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hf_model(path: str, arch: str):
    import torch
    import transformers

    cls = transformers.GPT2LMHeadModel if arch == "gpt2" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def hf_logprobs(path, arch: str, token_ids: list[int]) -> np.ndarray:
    """[positions, vocab]: row j is the log-distribution of token j + 1, no KV cache."""
    import torch

    with torch.no_grad():
        logits = _hf_model(str(path), arch)(torch.tensor([token_ids])).logits[0].to(torch.float32)
        return torch.log_softmax(logits, dim=-1).numpy()


def assert_matches_reference(ref: np.ndarray, prompt_tokens: int, generated: list[int], entries: list[dict],
                             targets: list[int], top: int) -> None:
    """`entries`: per generated token {token, logprob, top: [(id, lp)], targets: [(id, lp)]}."""
    assert len(entries) == len(generated)
    for i, (token, e) in enumerate(zip(generated, entries)):
        row = ref[prompt_tokens + i - 1]
        assert e["token"] == token
        assert abs(e["logprob"] - row[token]) < TOL, (i, e["logprob"], row[token])
        want = np.argsort(-row, kind="stable")[:top]
        assert [t for t, _ in e["top"]] == want.tolist(), i
        np.testing.assert_allclose([lp for _, lp in e["top"]], row[want], atol=TOL)
        assert [t for t, _ in e["targets"]] == targets
        np.testing.assert_allclose([lp for _, lp in e["targets"]], row[targets], atol=TOL)
    if top:
        assert all(e["top"][0][0] == e["token"] for e in entries)  # greedy: the best token was taken


# --- the engine -------------------------------------------------------------------------------
@pytest.fixture(params=["llama", "gpt2"])
def arch(request) -> str:
    return request.param


def engine_entries(completion) -> list[dict]:
    return [{"token": e.token, "logprob": e.logprob, "top": e.top, "targets": e.targets}
            for e in completion.logprobs]


def targets_for(vocab: int) -> list[int]:
    return [vocab - 1, 0, 2, 0]  # the last id, an end token, a repeat: order as asked


def test_engine_greedy_logprobs_equal_transformers(arch, request):
    lm = request.getfixturevalue(f"tiny_{arch}")
    path = request.getfixturevalue(f"tiny_{arch}_path")
    targets = targets_for(lm.info.vocab_size)
    out = Model(lm).generate(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=5,
                             logprob_token_ids=targets)
    generated = out.token_ids[out.prompt_tokens:]
    ref = hf_logprobs(path, arch, out.token_ids)
    assert_matches_reference(ref, out.prompt_tokens, generated, engine_entries(out), targets, 5)
    assert all(type(v) is float for e in out.logprobs for v in (e.logprob, *(lp for _, lp in e.top)))


def test_engine_stream_events_carry_the_same_entries(tiny_llama):
    model = Model(tiny_llama)
    kwargs = dict(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2)
    events = list(model.stream(**kwargs))
    assert [e.logprob for e in events] == events[-1].result.logprobs
    assert [e.logprob.token for e in events] == [e.token for e in events]


def test_target_ids_alone_report_without_top(tiny_gpt2, tiny_gpt2_path):
    out = Model(tiny_gpt2).generate(prompt=PROMPT, max_tokens=3, temperature=0, logprob_token_ids=[7, 11])
    assert len(out.logprobs) == out.completion_tokens
    assert all(e.top == [] and [t for t, _ in e.targets] == [7, 11] for e in out.logprobs)
    ref = hf_logprobs(tiny_gpt2_path, "gpt2", out.token_ids)
    assert_matches_reference(ref, out.prompt_tokens, out.token_ids[out.prompt_tokens:], engine_entries(out),
                             [7, 11], 0)


def test_without_logprobs_nothing_is_reported_and_generation_is_unchanged(tiny_llama):
    model = Model(tiny_llama)
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=7, top_k=20)):
        plain = model.generate(prompt=PROMPT, max_tokens=MAX_TOKENS, **sampling)
        asked = model.generate(prompt=PROMPT, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=20,
                               logprob_token_ids=[1, 2, 3], **sampling)
        assert plain.logprobs is None and asked.logprobs is not None
        assert plain.token_ids == asked.token_ids and plain.text == asked.text
    assert all(e.logprob is None for e in model.stream(prompt=PROMPT, max_tokens=2))


def test_top_logprobs_with_a_capture(tiny_llama):
    """Logprobs and activations in one generation: the capture's extra step reports nothing."""
    model = Model(tiny_llama)
    out = model.generate(prompt=PROMPT, max_tokens=3, temperature=0, hooks=HOOK, logprobs=True, top_logprobs=1)
    plain = model.generate(prompt=PROMPT, max_tokens=3, temperature=0, hooks=None, logprobs=True, top_logprobs=1)
    assert out.logprobs == plain.logprobs and len(out.logprobs) == out.completion_tokens


def test_a_bfloat16_model_reports_float32_logprobs(tiny_llama_path):
    """Values from a float32 log-softmax, not rounded to bfloat16's ~3 digits."""
    import mlx.core as mx

    from engine.model import load_model

    lm = load_model(str(tiny_llama_path), "tiny-llama-bf16")
    lm.model.set_dtype(mx.bfloat16)
    out = Model(lm).generate(prompt=PROMPT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=5)
    values = np.array([lp for e in out.logprobs for _, lp in e.top], dtype=np.float32)
    rounded = np.array(mx.array(values).astype(mx.bfloat16).astype(mx.float32))
    assert (values != rounded).any()
    assert all(e.top[0][0] == e.token for e in out.logprobs)


def test_plan_takes_logprob_options(tiny_llama):
    plan = Model(tiny_llama).plan(prompt=PROMPT, logprobs=LogprobOptions(logprobs=True, top_logprobs=3))
    assert plan.logprobs.top_logprobs == 3
    assert Model(tiny_llama).plan(prompt=PROMPT).logprobs == LogprobOptions()


@pytest.mark.parametrize("kwargs,arg", [
    (dict(top_logprobs=3), "logprobs.top_logprobs"),
    (dict(logprobs=True, top_logprobs=21), "logprobs.top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "logprobs.top_logprobs"),
    (dict(logprobs=1), "logprobs.logprobs"),
    (dict(logprob_token_ids=[1, "2"]), "logprobs.token_ids[1]"),
    (dict(logprob_token_ids=[-1]), "logprobs.token_ids[0]"),
    (dict(logprob_token_ids=list(range(65))), "logprobs.token_ids"),
    (dict(logprob_token_ids=[0, 10**6]), "logprobs.token_ids[1]"),
])
def test_engine_rejects_bad_options(tiny_llama, kwargs, arg):
    with pytest.raises(InvalidArgument) as exc:
        Model(tiny_llama).generate(prompt=PROMPT, max_tokens=1, **kwargs)
    assert exc.value.arg == arg, exc.value.message


def test_options_rules():
    with pytest.raises(ValueError, match="top_logprobs requires logprobs to be true"):
        LogprobOptions(top_logprobs=1)
    assert LogprobOptions(token_ids=[3]).wanted and not LogprobOptions().wanted
    assert LogprobOptions(logprobs=True, top_logprobs=20).top_logprobs == 20


# --- HTTP ---------------------------------------------------------------------------------------
@pytest.fixture
def base(tiny_server) -> str:
    return tiny_server.base_url


def http_entries(content: list[dict]) -> list[dict]:
    return [{"token": e["token_id"], "logprob": e["logprob"],
             "top": [(t["token_id"], t["logprob"]) for t in e["top_logprobs"]],
             "targets": [(t["token_id"], t["logprob"]) for t in e.get("target_logprobs", [])]} for e in content]


def stream_content(r: requests.Response) -> tuple[list[dict], list[dict]]:
    """(the logprobs entries of every chunk, in order; the chunks)."""
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [c for c in events[:-1] if c.get("choices")]
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk
    content = []
    for c in chunks[1:]:
        lp = c["choices"][0]["logprobs"]
        assert lp is not None and len(lp["content"]) == 1, c  # one entry per token event
        content += lp["content"]
    return content, chunks


def post(base: str, path: str, **fields) -> requests.Response:
    body = {**chat_body(max_tokens=MAX_TOKENS), **fields}
    if path == ACT:
        body.setdefault("activation_hooks", HOOK)
    return requests.post(base + path, json=body, stream=bool(fields.get("stream")), timeout=60)


@pytest.mark.parametrize("path", [CHAT, ACT])
def test_http_logprobs_equal_transformers_streamed_or_not(base, path, tiny_llama, tiny_llama_path):
    targets = targets_for(tiny_llama.info.vocab_size)
    asked = dict(logprobs=True, top_logprobs=3, logprob_token_ids=targets)
    r = post(base, path, **asked)
    assert r.status_code == 200, r.text
    body = r.json()
    logprobs = body["choices"][0]["logprobs"]
    content = logprobs["content"]
    assert logprobs["refusal"] is None and len(content) == body["usage"]["completion_tokens"]
    for e in content:
        assert e["token"] == tiny_llama.tokenizer.decode([e["token_id"]])
        assert e["bytes"] == list(e["token"].encode("utf-8"))
        assert len(e["top_logprobs"]) == 3 and all(set(t) == {"token", "logprob", "bytes", "token_id"}
                                                   for t in e["top_logprobs"])
        assert [t["token"] for t in e["target_logprobs"]] == [tiny_llama.tokenizer.decode([t]) for t in targets]

    prompt = prompt_ids(tiny_llama, messages=chat_body()["messages"])[0]
    generated = [e["token_id"] for e in content]
    ref = hf_logprobs(tiny_llama_path, "llama", prompt + generated)
    assert_matches_reference(ref, len(prompt), generated, http_entries(content), targets, 3)
    if path == ACT:
        assert body["token_ids"] == prompt + generated

    streamed, chunks = stream_content(post(base, path, stream=True, **asked))
    assert streamed == content
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        body["choices"][0]["message"]["content"]


def test_http_stream_loses_no_entry(base):
    """The end token (no text) and tokens whose text is held back still bring their entries."""
    held_back = 0
    for fields in (dict(messages=[{"role": "user", "content": "Hello"}]),  # ends at once with the end token
                   dict(stop=["<|im_start|>X"]),  # "<|im_start|>" is held back: it may begin the stop string
                   dict(stream_options={"include_usage": True})):
        r = post(base, CHAT, stream=True, logprobs=True, **fields)
        content, chunks = stream_content(r)
        full = post(base, CHAT, logprobs=True, **{k: v for k, v in fields.items() if k != "stream_options"}).json()
        assert content == full["choices"][0]["logprobs"]["content"], fields
        assert len(content) == full["usage"]["completion_tokens"]
        assert chunks[-1]["choices"][0]["finish_reason"] is not None
        held_back += sum(not c["choices"][0]["delta"].get("content") for c in chunks[1:])
    assert held_back >= 2  # the end token's chunk and at least one held-back token's


def test_http_with_inline_activations_stream_keeps_both(base):
    content, chunks = stream_content(post(base, ACT, stream=True, logprobs=True, max_tokens=3))
    assert len(content) >= 1 and "activations" in chunks[-1]
    full = post(base, ACT, logprobs=True, max_tokens=3).json()
    assert content == full["choices"][0]["logprobs"]["content"]


def test_http_without_logprobs_is_null_and_unchanged(base):
    plain = post(base, CHAT).json()
    assert plain["choices"][0]["logprobs"] is None
    asked = post(base, CHAT, logprobs=True, top_logprobs=20, logprob_token_ids=[0]).json()
    assert asked["choices"][0]["message"] == plain["choices"][0]["message"]
    assert "target_logprobs" not in post(base, CHAT, logprobs=True).json()["choices"][0]["logprobs"]["content"][0]
    events = sse_events(post(base, CHAT, stream=True, logprobs=False))
    assert all(c["choices"][0]["logprobs"] is None for c in events[:-1])


def test_openai_package_parses_logprobs(base):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
    msgs = chat_body()["messages"]
    resp = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert all(isinstance(c.logprob, float) and c.bytes == list(c.token.encode()) for c in content)
    assert content[0].model_extra["token_id"] == content[0].top_logprobs[0].model_extra["token_id"]

    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=MAX_TOKENS,
                                            temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=1, top_logprobs=2)
    assert exc.value.body["param"] == "top_logprobs" or exc.value.body["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("path", [CHAT, ACT])
@pytest.mark.parametrize("fields,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"logprob_token_ids": 5}, "logprob_token_ids"),
    ({"logprob_token_ids": [1, "2"]}, "logprob_token_ids[1]"),
    ({"logprob_token_ids": [1, 2.5]}, "logprob_token_ids[1]"),
    ({"logprob_token_ids": [-1]}, "logprob_token_ids[0]"),
    ({"logprob_token_ids": list(range(65))}, "logprob_token_ids"),
    ({"logprob_token_ids": [0, 1, 2, 10**6]}, "logprob_token_ids[3]"),
])
def test_http_bad_values_are_400_naming_the_field(base, path, fields, param):
    err = assert_error(post(base, path, **fields), 400, param=param)
    assert "logprobs." not in err["message"], err  # the request's names, not the engine's


def test_http_token_id_past_the_vocabulary_says_so(base, tiny_llama):
    vocab = tiny_llama.info.vocab_size
    err = assert_error(post(base, CHAT, logprob_token_ids=[vocab]), 400, param="logprob_token_ids[0]")
    assert f"logprob_token_ids[0] is token id {vocab}" in err["message"]
    err = assert_error(post(base, CHAT, stream=True, logprob_token_ids=[vocab]), 400, param="logprob_token_ids[0]")
    assert post(base, CHAT, max_tokens=1, logprob_token_ids=[vocab - 1]).status_code == 200
