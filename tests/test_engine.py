"""The engine: loading, model facts, chat prompts, generation and its errors.

Fast tests use the tiny random llama and gpt2 models; `slow` ones the real SmolLM2-135M.
"""

from __future__ import annotations

import json
import shutil

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx_lm
import pytest

from engine.api import Model
from engine.errors import (
    ContextLengthExceeded, EngineError, InvalidArgument, ModelLoadError, ModelNotFound, UnsupportedArchitecture,
)
from engine.generate import Completion, generate
from engine.model import ModelInfo, default_model_id, load_model, resolve_model_path
from engine.params import SamplingParams, parse
from engine.plan import plan, prompt_ids

PROMPTS = ["What is the capital of France?", "John gave Mary the book", "The answer is", "Hello, how are you?"]


def run(lm, prompt, **params) -> tuple[list, Completion]:
    """-> (events, completion) for a list of token ids and sampling params (greedy by default)."""
    params.setdefault("temperature", 0.0)
    events = list(generate(plan(lm, prompt=prompt, sampling=parse(SamplingParams, None, **params))))
    return events, events[-1].result


def chat(lm, text):
    return lm.chat_prompt([{"role": "user", "content": text}])


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


# --------------------------------------------------------------------------------------------
# Loading and model facts
# --------------------------------------------------------------------------------------------
def test_tiny_llama_facts(tiny_llama, tiny_llama_path):
    info = tiny_llama.info
    assert isinstance(info, ModelInfo)
    assert info.to_dict() == {
        "model_id": "tiny-llama", "architecture": "llama", "n_layers": 3, "d_model": 64, "n_heads": 4,
        "n_kv_heads": 2, "d_head": 16, "d_mlp": 128, "vocab_size": 323, "context_length": 256, "dtype": "float32",
        "source": str(tiny_llama_path), "quantization": None, "n_experts": 0,
    }
    assert tiny_llama.arch.name == "llama"


def test_tiny_gpt2_facts(tiny_gpt2):
    d = tiny_gpt2.info.to_dict()
    assert (d["architecture"], d["n_layers"], d["d_model"], d["n_heads"], d["n_kv_heads"], d["d_head"]) == (
        "gpt2", 3, 64, 4, 4, 16)
    assert (d["vocab_size"], d["context_length"], d["dtype"]) == (323, 256, "float32")


def test_model_id_defaults_to_folder_name(tiny_llama_path):
    lm = load_model(str(tiny_llama_path) + "/")
    assert lm.info.model_id == "tiny-llama"
    assert default_model_id("/x/My Model.Q4_1.GGUF") == "my-model.q4_1"


def test_repo_ids_are_left_to_mlx_lm():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", False)


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(ModelNotFound) as info:
        load_model(str(tmp_path / "nope"))
    assert info.value.arg == "model_path" and "does not exist" in info.value.message
    with pytest.raises(ModelNotFound):
        load_model("./relative/not/here")


@pytest.mark.parametrize("value", ["", "   ", None, 3])
def test_empty_model_path_is_invalid(value):
    with pytest.raises(InvalidArgument) as info:
        load_model(value)
    assert info.value.arg == "model_path"


def test_folder_without_config_is_a_load_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        load_model(str(tmp_path))
    assert info.value.arg == "model_path" and not isinstance(info.value, UnsupportedArchitecture)


def test_file_that_is_not_gguf_is_a_load_error(tmp_path, tiny_llama_path):
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(str(tiny_llama_path / "config.json"))


def test_folder_with_broken_weights_is_a_load_error(tmp_path, tiny_llama_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama_path, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError):
        load_model(str(folder))


def test_unknown_model_type_is_a_load_error(tmp_path, tiny_llama_path):
    folder = tmp_path / "alien"
    shutil.copytree(tiny_llama_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    with pytest.raises(ModelLoadError, match="no_such_architecture"):
        load_model(str(folder))


def test_unsupported_architecture(tmp_path, tiny_llama_path):
    """A real tiny Mamba model: mlx-lm runs it, but it has no attention or MLP blocks to capture."""
    import transformers

    folder = tmp_path / "tiny-mamba"
    config = transformers.MambaConfig(vocab_size=323, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2,
                                      conv_kernel=4)
    transformers.MambaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_path / name, folder / name)
    mlx_lm.load(str(folder))  # mlx-lm itself can load it
    with pytest.raises(UnsupportedArchitecture) as info:
        load_model(str(folder))
    err = info.value
    assert isinstance(err, ModelLoadError) and isinstance(err, EngineError)
    assert "'mamba'" in err.message and "attn" in err.message and "mlp" in err.message
    assert err.arg == "model_path"


# --------------------------------------------------------------------------------------------
# Chat prompts
# --------------------------------------------------------------------------------------------
def test_chat_prompt_uses_fallback_template(tiny_llama):
    ids = tiny_llama.chat_prompt([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hello"}])
    assert tiny_llama.tokenizer.decode(ids) == "system: Be brief.\nuser: Hello\nassistant:"


def test_chat_prompt_accepts_text_content_parts(tiny_llama):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    before = [dict(m) for m in parts]
    assert prompt_ids(tiny_llama, messages=parts) == (chat(tiny_llama, "Hello"), "messages")
    assert parts == before  # the caller's messages are not rewritten


@pytest.mark.parametrize("content", [[{"type": "image_url"}], [None, None], [{"type": "text", "text": 5}]],
                         ids=["image", "nulls", "non-string-text"])
def test_chat_prompt_rejects_other_content_parts(tiny_llama, content):
    """A part the model cannot read is an error, not silently dropped."""
    with pytest.raises(InvalidArgument) as info:
        prompt_ids(tiny_llama, messages=[{"role": "user", "content": content}])
    assert info.value.arg == "messages[0].content" and "text" in info.value.message


@pytest.mark.parametrize("messages", [
    [], None, "hello", [{"role": "user"}], [{"role": "wizard", "content": "hi"}], ["hi"],
    [{"role": "user", "content": 5}], {"role": "user", "content": "hi"},
], ids=["empty", "none", "string", "no-content", "bad-role", "not-object", "non-string", "not-a-list"])
def test_bad_messages(tiny_llama, messages):
    with pytest.raises(InvalidArgument) as info:
        prompt_ids(tiny_llama, messages=messages)
    assert info.value.arg.startswith("messages")


# --------------------------------------------------------------------------------------------
# Sampling parameters
# --------------------------------------------------------------------------------------------
BAD_PARAMS = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True), ("max_tokens", "3"),
    ("temperature", -0.1), ("temperature", 101), ("temperature", "1"), ("temperature", False),
    ("top_p", 0), ("top_p", 1.1), ("top_p", -1), ("top_p", "0.5"),
    ("top_k", -1), ("top_k", 1.5), ("top_k", "2"),
    ("seed", "x"), ("seed", 1.5), ("seed", True), ("seed", -1), ("seed", 2 ** 64),
    ("stop", ""), ("stop", [""]), ("stop", [1]), ("stop", ["a"] * 17), ("stop", 5),
]  # None is "not given" (the default), as in OpenAI's API


@pytest.mark.parametrize("field,value", BAD_PARAMS)
def test_invalid_sampling_values(tiny_llama, field, value):
    with pytest.raises(InvalidArgument) as info:
        parse(SamplingParams, None, **{field: value})
    assert info.value.arg.startswith(field) and field in info.value.message  # stop[0]: the string at fault
    with pytest.raises(InvalidArgument):  # the API checks when called, before any work
        Model(tiny_llama).stream(prompt="Hi", **{field: value})


def test_valid_sampling_values():
    p = parse(SamplingParams, None, max_tokens=1, temperature=0, top_p=1, top_k=0, seed=0, stop="x")
    assert p.stops == ["x"]
    parse(SamplingParams, None, temperature=100, top_p=0.01, top_k=5, seed=2 ** 64 - 1, stop=["a"] * 16)


@pytest.mark.parametrize("prompt", [[], ""])
def test_empty_prompt(tiny_llama, prompt):
    with pytest.raises(InvalidArgument, match="empty") as info:
        plan(tiny_llama, prompt=prompt)
    assert info.value.arg == "prompt"


def test_prompt_longer_than_context(tiny_llama):
    limit = tiny_llama.info.context_length
    with pytest.raises(ContextLengthExceeded) as info:
        plan(tiny_llama, prompt=[5] * limit)
    assert f"{limit} tokens" in info.value.message and info.value.arg == "prompt"
    with pytest.raises(ContextLengthExceeded) as info:  # an explicit max_tokens is never shortened
        run(tiny_llama, [5] * (limit - 1), max_tokens=50)
    assert info.value.arg == "max_tokens" and "at most 1" in info.value.message
    events, gen = run(tiny_llama, [5] * (limit - 1))  # the default max_tokens: what fits, one token
    assert len(events) == 1 and gen.finish_reason == "length"


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_equals_mlx_lm(tiny, text):
    prompt = chat(tiny, text)
    events, gen = run(tiny, prompt, max_tokens=24)
    ref = list(mlx_lm.stream_generate(tiny.model, tiny.tokenizer, prompt, max_tokens=24))
    assert [e.token for e in events] == [r.token for r in ref]
    assert gen.finish_reason == ref[-1].finish_reason
    if gen.finish_reason == "length":
        assert gen.text == mlx_lm.generate(tiny.model, tiny.tokenizer, prompt, max_tokens=24)


def test_eos_finishes_with_stop(tiny_llama):
    """The tiny llama answers "Hello" with its end-of-sequence token at once."""
    events, gen = run(tiny_llama, chat(tiny_llama, "Hello"), max_tokens=10)
    assert events[-1].token in tiny_llama.tokenizer.eos_token_ids
    assert gen.finish_reason == "stop" and events[-1].finish_reason == "stop"
    assert gen.text == "".join(e.text for e in events)
    assert "<|im_end|>" not in gen.text


def test_events_and_usage(tiny):
    prompt = chat(tiny, PROMPTS[0])
    events, gen = run(tiny, prompt, max_tokens=7)
    assert gen.finish_reason == "length" and [e.finish_reason for e in events] == [None] * 6 + ["length"]
    assert [e.index for e in events] == list(range(7)) and [e.step for e in events] == list(range(7))
    assert gen.prompt_tokens == len(prompt) and gen.completion_tokens == 7
    assert gen.token_ids == prompt + [e.token for e in events]
    assert "".join(e.text for e in events) == gen.text
    assert gen.text == tiny.tokenizer.decode([e.token for e in events])


def test_only_the_last_event_carries_the_result(tiny_llama):
    events, gen = run(tiny_llama, chat(tiny_llama, "Hi"), max_tokens=3)
    assert len(events) == 3 and events[-1].finish_reason == "length" and isinstance(gen, Completion)
    assert [e.result for e in events[:-1]] == [None, None] and [e.capture for e in events] == [None] * 3
    assert [e.completion_tokens for e in events] == [1, 2, 3] and gen.capture is None and gen.activations == {}
    assert gen.tokens == [tiny_llama.tokenizer.decode([t]) for t in gen.token_ids]


def _clean_text(tiny) -> tuple[list[int], Completion]:
    """A greedy completion with a stretch of clean ASCII text to pick stop strings from."""
    for text in PROMPTS:
        prompt = chat(tiny, text)
        _, gen = run(tiny, prompt, max_tokens=40)
        if sum(c.isalnum() for c in gen.text) >= 6:
            return prompt, gen
    pytest.fail("no usable completion")


@pytest.mark.parametrize("length", [1, 2, 3])
def test_stop_string_truncates_and_never_leaks(tiny, length):
    prompt, ref = _clean_text(tiny)
    full = ref.text
    # The first stretch of `length` alphanumerics that starts after the first few characters.
    at = next(i for i in range(2, len(full)) if full[i:i + length].isalnum() and len(full[i:i + length]) == length)
    stop = full[at:at + length]
    events, gen = run(tiny, prompt, max_tokens=40, stop=[stop])
    first = full.find(stop)
    assert gen.finish_reason == "stop" and events[-1].finish_reason == "stop"
    assert gen.text == full[:first]
    streamed = ""
    for e in events:
        streamed += e.text
        assert full.startswith(streamed) and stop not in streamed
    assert streamed == gen.text


def test_earliest_of_several_stop_strings_wins(tiny):
    """Two stop strings completed by the same token: the text ends before the earlier one,
    whatever their order in the list."""
    prompt, ref = _clean_text(tiny)
    full, completion, decode = ref.text, ref.token_ids[ref.prompt_tokens:], tiny.tokenizer.decode

    def candidates():
        for k in range(1, len(completion)):
            before, after = decode(completion[:k]), decode(completion[:k + 1])
            if not (full.startswith(before) and full.startswith(after)) or len(after) - len(before) < 2:
                continue
            p, piece = len(before), after[len(before):]
            yield p, piece[0], piece[1:]  # both inside the new token's text
            if p >= 2:
                yield p - 2, full[p - 2:p + 1], piece[1:]  # one started before it

    for cut, early, late in candidates():
        if full.find(early) == cut and full.find(late) > cut and "\ufffd" not in early + late:
            break
    else:
        pytest.skip("no token completes two fresh stop strings at once")
    for stops in ([late, early], [early, late]):
        events, gen = run(tiny, prompt, max_tokens=40, stop=stops)
        assert gen.finish_reason == "stop" and gen.text == full[:cut], stops
        assert "".join(e.text for e in events) == gen.text


def test_stop_string_never_seen(tiny):
    prompt, ref = _clean_text(tiny)
    events, gen = run(tiny, prompt, max_tokens=40, stop=["\x00never\x00"])
    assert gen.finish_reason == ref.finish_reason and gen.text == ref.text
    assert "".join(e.text for e in events) == ref.text


def test_max_tokens_gives_length(tiny):
    prompt = chat(tiny, PROMPTS[1])
    for n in (1, 2, 5):
        events, gen = run(tiny, prompt, max_tokens=n)
        assert len(events) == n and gen.finish_reason == "length" and gen.completion_tokens == n


def test_seed_reproducible_with_temperature(tiny):
    prompt = chat(tiny, PROMPTS[0])
    a = [e.token for e in run(tiny, prompt, max_tokens=16, temperature=1.0, seed=1234)[0]]
    b = [e.token for e in run(tiny, prompt, max_tokens=16, temperature=1.0, seed=1234)[0]]
    others = {tuple(e.token for e in run(tiny, prompt, max_tokens=16, temperature=1.0, seed=s)[0]) for s in (1, 2, 3)}
    greedy = [e.token for e in run(tiny, prompt, max_tokens=16)[0]]
    assert a == b
    assert len(others | {tuple(a)}) > 1 and tuple(greedy) != tuple(a)


def test_top_k_one_equals_greedy(tiny):
    for text in PROMPTS[:2]:
        prompt = chat(tiny, text)
        greedy = [e.token for e in run(tiny, prompt, max_tokens=16)[0]]
        top1 = [e.token for e in run(tiny, prompt, max_tokens=16, temperature=1.5, top_k=1, seed=7)[0]]
        tiny_p = [e.token for e in run(tiny, prompt, max_tokens=16, temperature=1.5, top_p=1e-6, seed=7)[0]]
        assert top1 == greedy and tiny_p == greedy


# --------------------------------------------------------------------------------------------
# The real default model (slow)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_facts(default_model):
    d = default_model.info.to_dict()
    assert d["model_id"] == "smollm2-135m-instruct"
    assert (d["architecture"], d["n_layers"], d["d_model"], d["n_heads"], d["n_kv_heads"], d["d_head"]) == (
        "llama", 30, 576, 9, 3, 64)
    assert (d["vocab_size"], d["context_length"], d["dtype"]) == (49152, 8192, "float32")


@pytest.mark.slow
def test_default_model_answers_paris(default_model):
    prompt = chat(default_model, "What is the capital of France?")
    assert default_model.tokenizer.decode(prompt).startswith("<|im_start|>")  # its own chat template
    events, gen = run(default_model, prompt, max_tokens=40)
    assert "Paris" in gen.text and gen.finish_reason == "stop"
    assert "".join(e.text for e in events) == gen.text


@pytest.mark.slow
@pytest.mark.parametrize("text", ["What is the capital of France?", "Write a haiku about the sea.",
                                  "List three prime numbers."])
def test_default_model_greedy_equals_mlx_lm(default_model, text):
    prompt = chat(default_model, text)
    events, gen = run(default_model, prompt, max_tokens=32)
    ref = list(mlx_lm.stream_generate(default_model.model, default_model.tokenizer, prompt, max_tokens=32))
    assert [e.token for e in events] == [r.token for r in ref]
    ref_text = mlx_lm.generate(default_model.model, default_model.tokenizer, prompt, max_tokens=32)
    assert gen.text == ref_text


@pytest.mark.slow
def test_default_model_stop_string(default_model):
    prompt = chat(default_model, "What is the capital of France?")
    full = run(default_model, prompt, max_tokens=40)[1].text
    events, gen = run(default_model, prompt, max_tokens=40, stop=["Paris"])
    assert gen.text == full[:full.find("Paris")] and gen.finish_reason == "stop"
    assert "".join(e.text for e in events) == gen.text and "Par" not in gen.text[-3:]


def test_rope_theta_from_transformers5_config_is_used(tiny_qwen2, tiny_qwen2_path):
    """transformers 5 keeps rope_theta only in rope_parameters; mlx-lm alone would use 1e6 for Qwen."""
    import json

    config = json.loads((tiny_qwen2_path / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 10000.0
    assert tiny_qwen2.model.args.rope_theta == 10000.0
