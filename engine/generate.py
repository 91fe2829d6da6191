"""Token-by-token generation with a KV cache, optionally capturing activations at every step.

The loop is ours rather than `mlx_lm.generate_step` so that each forward step is evaluated
before the next is built: captures are then tagged with the step that computed them. The
prompt runs as one forward step (step 0), each generated token as one more.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import engine  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from engine.capture import Capture
from engine.errors import ContextLengthExceeded, InvalidRequest
from engine.model import LoadedModel

DEFAULT_MAX_TOKENS = 256


@dataclass
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise InvalidRequest(f"'{name}' {rule} (got {getattr(self, name)!r})", name)

        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(_is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature", "must be a number in [0, 100]")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be a number in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0")
        check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "seed",
              "must be an integer in [0, 2**64)")  # mx.random.seed takes uint64 only
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check(
            isinstance(self.stop, list) and len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop),
            "stop", "must be a non-empty string or a list of at most 16 non-empty strings",
        )
        return self


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TokenEvent:
    """One generated token. `text` is the new visible text (held back while it may start a stop string)."""

    index: int  # 0-based index among generated tokens
    token: int
    text: str
    step: int  # the forward step whose logits produced this token (0 = prompt)
    finish_reason: str | None = None  # "stop" | "length" on the last event


@dataclass
class Generation:
    """Counts after (or during) generation; `token_ids` holds the prompt then generated tokens."""

    prompt_tokens: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_tokens


def _stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def generate(
    lm: LoadedModel,
    prompt: list[int],
    params: SamplingParams,
    capture: Capture | None = None,
    result: Generation | None = None,
) -> Iterator[TokenEvent]:
    """Yield generated tokens one by one. With a capture, every forward step is recorded,
    including one last step over the final token so that every position has activations."""
    params.validate()
    if not prompt:
        raise InvalidRequest("the prompt is empty", "messages")
    limit = lm.info.context_length
    if len(prompt) >= limit:
        raise ContextLengthExceeded(
            f"the prompt has {len(prompt)} tokens but the model's context is {limit}; shorten the messages", "messages"
        )
    max_tokens = min(params.max_tokens, limit - len(prompt))
    result = result if result is not None else Generation(prompt_tokens=len(prompt), token_ids=list(prompt))
    tokenizer = lm.tokenizer
    eos = set(tokenizer.eos_token_ids)
    sampler = make_sampler(temp=params.temperature, top_p=params.top_p, top_k=params.top_k)
    if params.seed is not None:
        mx.random.seed(params.seed)
    cache = make_prompt_cache(lm.model)

    def forward(tokens: list[int], step: int, start: int) -> mx.array:
        if capture is not None:
            capture.begin_step(step, start)
        logits = lm.model(mx.array(tokens)[None], cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        mx.eval(token, *(capture.end_step() if capture is not None else ()))
        return token

    generated: list[int] = []
    sent = 0  # characters of the decoded completion already yielded
    with capture.installed(lm) if capture is not None else nullcontext():
        step = 0
        token = forward(prompt, step, 0)
        while True:
            tok = int(token.item())
            generated.append(tok)
            result.token_ids.append(tok)
            position = len(result.token_ids) - 1
            text = tokenizer.decode([t for t in generated if t not in eos])
            finish = "stop" if tok in eos else None
            visible = text
            hits = [at for s in params.stop if (at := text.find(s, max(0, sent - len(s)))) >= 0]
            if hits:  # the earliest stop string wins, whatever its place in the list
                visible, finish = text[:min(hits)], "stop"
            if finish is None and len(generated) >= max_tokens:
                finish = "length"
            if finish is None:
                # Hold back a possible stop-string prefix and an incomplete UTF-8 character.
                end = len(text) - _stop_holdback(text, params.stop)
                while end > sent and text[end - 1] == "\ufffd":
                    end -= 1
                visible = text[:end]
            delta, sent = visible[sent:], max(sent, len(visible))
            if finish is not None:
                result.text, result.finish_reason = visible, finish
                if capture is not None:  # the final token's own activations
                    forward([tok], step + 1, position)
                yield TokenEvent(len(generated) - 1, tok, delta, step, finish)
                return
            yield TokenEvent(len(generated) - 1, tok, delta, step)
            step += 1
            token = forward([tok], step, position)
