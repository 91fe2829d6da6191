"""Token-by-token generation of a plan (engine/plan.py), optionally capturing activations.

Three layers, each adding one concern and passing plain values up (as mlx-lm's
`generate_step` / `stream_generate` do):

- `Forward` runs the model one step at a time with a KV cache and samples: the prompt is
  step 0, each generated token one more step. Each step is evaluated (with its captures and
  the log-probabilities the plan asks for) before the next is built, so captures are tagged
  with the step that computed them.
- `VisibleText` is the completion's text: detokenized incrementally (linear in its length),
  cut before the earliest stop string, held back while its end may begin one.
- `generate(plan)` is the loop: finish reasons, the extra step that gives the last token its
  own activations, one `TokenEvent` per token, and the `Completion` on the last one.
"""

from __future__ import annotations

import functools
import secrets
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import engine  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from engine.capture import Capture
from engine.model import LoadedModel
from engine.params import LogprobOptions, SamplingParams
from engine.records import CaptureResult

if TYPE_CHECKING:
    from engine.plan import GenerationPlan


@dataclass
class TokenLogprob:
    """Log-probabilities at the step that produced one generated token, from that step's float32
    log-softmax: the token's own, the `top` tokens (best first, ties by lower id) and the
    requested `targets` (in the order asked), as (token id, log-probability) pairs."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    targets: list[tuple[int, float]]


@dataclass
class Completion:
    """A finished generation. `token_ids` and `tokens` cover every position: the prompt, then
    the generated tokens (an end-of-sequence token included; it is not part of `text`)."""

    text: str
    token_ids: list[int]
    tokens: list[str]  # decoded text of each position, for labelling axes
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length" (max_tokens)
    model_id: str
    capture: CaptureResult | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token; None unless the plan asks
    interventions: list[dict] = field(default_factory=list)  # Intervention.report: positions touched per step


    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_tokens

    @functools.cached_property
    def activations(self) -> dict[str, np.ndarray]:
        """hook_id -> [positions, *per_token] (`CaptureResult.arrays`: every captured step joined
        token-major, attention keys padded; `<id>:input` for the input of a hook captured both
        ways). Empty without a capture."""
        return self.capture.arrays() if self.capture is not None else {}


@dataclass
class TokenEvent:
    """One generated token, as it is produced.

    `text` is the new visible text (possibly empty: held back while it may begin a stop
    string or while a character is incomplete). `step` is the forward step whose logits
    produced the token (0 = the prompt). `capture` is the live capture (None without hooks):
    its records hold every step up to `step`, and on the last event also the final token's
    own step (`step + 1`). The last event has `finish_reason` and `result`."""

    index: int  # 0-based among generated tokens
    token: int
    text: str
    step: int
    prompt_tokens: int
    finish_reason: str | None = None
    capture: Capture | None = None
    result: Completion | None = None
    logprob: TokenLogprob | None = None  # when the plan asks for log-probabilities

    @property
    def completion_tokens(self) -> int:
        return self.index + 1


class StepLogprobs:
    """The log-probabilities a plan reports at each step: lazy arrays built beside the sampler, so
    they are evaluated with the step (no extra evaluation), then read back as a TokenLogprob."""

    def __init__(self, options: LogprobOptions):
        self._top = options.top_logprobs
        self._targets = options.token_ids
        self._target_index = mx.array(options.token_ids, dtype=mx.uint32) if options.token_ids else None

    def arrays(self, logits: mx.array, logprobs: mx.array, token: mx.array) -> dict[str, mx.array]:
        """`logits`/`logprobs` [1, vocab], `token` [1] (the sampled one): lazy float32 values."""
        if logprobs.dtype != mx.float32:  # a bfloat16 log-softmax keeps ~3 digits: too few for logit differences
            logits = logits.astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        lp = logprobs[0]
        out = {"logprob": lp[token]}
        k = min(self._top, lp.shape[-1])
        if k:
            top = mx.argpartition(-lp, kth=k - 1)[:k]  # the k best, unordered: read() sorts them
            out.update(top_ids=top, top_values=lp[top])
        if self._target_index is not None:
            out["targets"] = lp[self._target_index]
        return out

    def read(self, token: int, arrays: dict[str, mx.array]) -> TokenLogprob:
        """The evaluated `arrays` as Python values (a few dozen numbers at most)."""
        top = []
        if "top_ids" in arrays:
            top = sorted(zip(arrays["top_ids"].tolist(), arrays["top_values"].tolist()), key=lambda p: (-p[1], p[0]))
        targets = list(zip(self._targets, arrays["targets"].tolist())) if "targets" in arrays else []
        return TokenLogprob(token, arrays["logprob"].item(), top, targets)


def capture_cache(model) -> list:
    """A fresh prompt cache for a forward with a capture installed. A rotating cache (sliding-window
    layers) keeps only the window's keys, in ring order; the capture's key axis and key/value
    interventions need every key at its position. A full cache with the window in the mask
    computes the same attention."""
    return [KVCache() if isinstance(c, RotatingKVCache) else c for c in make_prompt_cache(model)]


class Sampler:
    """A request's sampler: mlx-lm's filters, then a draw. A seeded request draws from its own
    random stream, so it samples the same tokens alone or beside other requests in a batch."""

    def __init__(self, sampling: SamplingParams, vocab_size: int):
        self._temp = sampling.temperature
        self._filters = []
        if 0 < sampling.top_p < 1.0:
            self._filters.append(functools.partial(apply_top_p, top_p=sampling.top_p))
        if 0 < sampling.top_k < vocab_size:  # the whole vocabulary keeps every token: off
            self._filters.append(functools.partial(apply_top_k, top_k=sampling.top_k))
        self._key = None if sampling.seed is None else mx.random.key(sampling.seed)

    @property
    def greedy(self) -> bool:
        return self._temp == 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self._temp == 0:
            return mx.argmax(logprobs, axis=-1)
        for keep in self._filters:
            logprobs = keep(logprobs)
        key = None
        if self._key is not None:
            self._key, key = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1 / self._temp), key=key)


class Forward:
    """The model, one forward step at a time, with a KV cache and the plan's sampler.

    With `logprobs` that ask for any, `logprob` is the last sampled token's TokenLogprob. A
    batch (engine/batch.py) runs the model itself and uses `draw` and `advance` per row."""

    def __init__(self, lm: LoadedModel, sampling: SamplingParams, capture: Capture | None = None,
                 logprobs: LogprobOptions | None = None):
        self._model = lm.model
        self.cache = capture_cache(lm.model) if capture is not None else make_prompt_cache(lm.model)
        self._sampler = Sampler(sampling, lm.info.vocab_size)
        self._capture = capture
        self._logprobs = StepLogprobs(logprobs) if logprobs is not None and logprobs.wanted else None
        self._reported: dict[str, mx.array] | None = None
        self.logprob: TokenLogprob | None = None
        self.step = 0  # index of the next step
        self.position = 0  # position of the next step's first token

    def __call__(self, tokens: list[int], sample: bool = True) -> int | None:
        """Run `tokens` through the model; return the sampled next token (None: `sample=False`,
        a step run only for its captures, whose logits are never computed)."""
        capture = self._capture
        if capture is not None:
            capture.begin_step(self.step, self.position)
        out = self._model(mx.array(tokens)[None], cache=self.cache)  # lazy: evaluated below, as needed
        pending = capture.end_step() if capture is not None else []
        token = self.draw(out[:, -1, :], pending) if sample else None
        mx.eval(*pending)
        return self.advance(len(tokens), token)

    def draw(self, logits: mx.array, pending: list[mx.array]) -> mx.array:
        """The next token from `logits` [1, vocab], lazy; it and the log-probabilities to report
        are appended to `pending`, for the caller to evaluate with the step."""
        if self._logprobs is None and self._sampler.greedy:  # no log-softmax over the vocabulary needed
            token = mx.argmax(logits, axis=-1)
            pending.append(token)
            return token
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self._sampler(logprobs)
        pending.append(token)
        if self._logprobs is not None:
            self._reported = self._logprobs.arrays(logits, logprobs, token)
            pending.extend(self._reported.values())
        return token

    def advance(self, n_tokens: int, token: mx.array | None) -> int | None:
        """After the step's evaluation: count the step, and read the drawn token (if any)."""
        self.step += 1
        self.position += n_tokens
        if token is None:
            return None
        token = int(token.item())
        self.logprob = self._logprobs.read(token, self._reported) if self._reported is not None else None
        return token


def _stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class VisibleText:
    """The completion's text as it may be shown: tokens in, newly visible text out."""

    def __init__(self, detokenizer, stops: list[str]):
        self._detok = detokenizer  # a reset mlx-lm StreamingDetokenizer (engine.detokenize)
        self._stops = stops
        self.sent = 0  # characters of the detokenized text released so far
        self.stopped = False  # a stop string was found; nothing more is released

    @property
    def text(self) -> str:
        return self._detok.text[: self.sent]

    def add(self, token: int) -> str:
        self._detok.add_token(token)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush the detokenizer (an unfinished character becomes U+FFFD, as decode gives) and
        release what was held back."""
        self._detok.finalize()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text, sent = self._detok.text, self.sent
        if self.stopped:
            return ""
        # A stop string cannot lie wholly inside released text (it would have been found, or
        # held back), so the search starts just before the released end: linear overall.
        hits = [at for s in self._stops if (at := text.find(s, max(0, sent - len(s)))) >= 0]
        if hits:  # the earliest stop string wins, whatever its place in the list
            end, self.stopped = min(hits), True
        else:
            end = len(text) if final else len(text) - _stop_holdback(text, self._stops)
        self.sent = max(end, sent)
        return text[sent: self.sent]


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """The decoded text of each token on its own (one decode per distinct token)."""
    texts = {t: tokenizer.decode([t]) for t in set(token_ids)}
    return [texts[t] for t in token_ids]


class Generation:
    """One request's generated tokens, as the model produces them: finish reasons (end of
    sequence, stop string, max_tokens, deadline), one TokenEvent per token and, at the end, the
    Completion. The same bookkeeping serves a request run alone (`generate`) and a row of a
    batch (engine/batch.py); the caller runs the model.

    With hooks, `capture` is installed around every forward step of the request; after the
    last token, one more step over it (no sampling) gives it its own activations."""

    def __init__(self, plan: GenerationPlan, deadline: float | None = None):
        self.plan = plan
        self.deadline = deadline
        targets = list(plan.targets or ())
        # One Capture installs both the hooks and the interventions; `recorded` is it when it records.
        self.capture = Capture(plan.lm, targets, plan.capture, plan.interventions) \
            if targets or plan.interventions else None
        self.recorded = self.capture if targets else None
        self.forward = Forward(plan.lm, plan.sampling, self.capture, plan.logprobs)
        self.prompt = list(plan.prompt)
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if plan.logprobs.wanted else None
        self.finish: str | None = None
        self._eos = set(plan.lm.tokenizer.eos_token_ids)
        self._text = VisibleText(plan.lm.detokenizer(), plan.sampling.stops)
        self._delta = ""

    @property
    def needs_final_step(self) -> bool:
        """Finished, and the last token's own activations are still to be computed."""
        return self.finish is not None and self.recorded is not None

    def accept(self, token: int) -> TokenEvent | None:
        """Take a sampled token (with `forward.logprob`); its TokenEvent, or None when it
        finished the generation (`finish` is set; `final_event` reports the last token)."""
        index = len(self.generated)
        self.generated.append(token)
        if self.logprobs is not None:
            self.logprobs.append(self.forward.logprob)
        text = self._text
        if token in self._eos:  # not part of the text
            self._delta, self.finish = text.finish(), "stop"
        else:
            self._delta = text.add(token)
            finish = "stop" if text.stopped else None
            out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
            if finish is None and (len(self.generated) >= self.plan.sampling.max_tokens or out_of_time):
                self._delta += text.finish()
                finish = "stop" if text.stopped else "length"
            self.finish = finish
        if self.finish is not None:
            return None
        return TokenEvent(index, token, self._delta, index, len(self.prompt), capture=self.recorded,
                          logprob=self.forward.logprob)

    def final_event(self) -> TokenEvent:
        """The last token's event, carrying the Completion."""
        plan, capture, recorded, lm = self.plan, self.capture, self.recorded, self.plan.lm
        token_ids = self.prompt + self.generated
        tokens = token_texts(lm.tokenizer, token_ids)
        result = Completion(
            text=self._text.text, token_ids=token_ids, tokens=tokens, prompt_tokens=len(self.prompt),
            finish_reason=self.finish, model_id=lm.info.model_id, logprobs=self.logprobs,
            interventions=[iv.report(n) for iv, n in zip(plan.interventions, capture.touched)] if capture else [],
            capture=None if recorded is None else CaptureResult(
                capture_id="cap_" + secrets.token_hex(8), model_id=lm.info.model_id, token_ids=token_ids,
                tokens=tokens, prompt_tokens=len(self.prompt), hooks=recorded.records),
        )
        index = len(self.generated) - 1
        return TokenEvent(index, self.generated[-1], self._delta, index, len(self.prompt), self.finish, recorded,
                          result, self.forward.logprob)


def generate(plan: GenerationPlan, deadline: float | None = None) -> Iterator[TokenEvent]:
    """Yield the plan's generated tokens one by one; the last event carries the Completion.
    Past `deadline` (time.monotonic()) generation ends as if max_tokens were reached ("length").

    With hooks, the capture is installed on the model while the generator runs and removed
    when it ends, fails or is closed (closing it early is how a caller cancels). Every forward
    step is recorded, including one last step over the final token so that every position has
    activations."""
    gen = Generation(plan, deadline)
    capture, forward = gen.capture, gen.forward
    with capture.installed(plan.lm) if capture is not None else nullcontext():
        token = forward(gen.prompt)
        while (event := gen.accept(token)) is not None:
            yield event
            token = forward([token])
        if gen.needs_final_step:
            forward([token], sample=False)  # the final token's own activations
    # Uninstalled before the last event: a caller that stops reading here leaves nothing behind.
    yield gen.final_event()
