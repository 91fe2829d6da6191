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
from mlx_lm.sample_utils import make_sampler

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


class Forward:
    """The model, one forward step at a time, with a KV cache and the plan's sampler.

    With `logprobs` that ask for any, `logprob` is the last sampled token's TokenLogprob."""

    def __init__(self, lm: LoadedModel, sampling: SamplingParams, capture: Capture | None = None,
                 logprobs: LogprobOptions | None = None):
        self._model = lm.model
        self._cache = make_prompt_cache(lm.model)
        if capture is not None:
            # A rotating cache (sliding-window layers) keeps only the window's keys, in ring order; the
            # capture's key axis and key/value interventions need every key at its position. A full
            # cache with the window in the mask computes the same attention.
            self._cache = [KVCache() if isinstance(c, RotatingKVCache) else c for c in self._cache]
        # top_k = the whole vocabulary keeps every token: off (mlx-lm's sampler takes fewer only).
        top_k = 0 if sampling.top_k >= lm.info.vocab_size else sampling.top_k
        self._sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p, top_k=top_k)
        self._capture = capture
        self._logprobs = StepLogprobs(logprobs) if logprobs is not None and logprobs.wanted else None
        self.logprob: TokenLogprob | None = None
        self.step = 0  # index of the next step
        self.position = 0  # position of the next step's first token
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)

    def __call__(self, tokens: list[int], sample: bool = True) -> int | None:
        """Run `tokens` through the model; return the sampled next token (None: `sample=False`,
        a step run only for its captures, whose logits are never computed)."""
        capture = self._capture
        if capture is not None:
            capture.begin_step(self.step, self.position)
        out = self._model(mx.array(tokens)[None], cache=self._cache)  # lazy: evaluated below, as needed
        pending = capture.end_step() if capture is not None else []
        token = reported = None
        if sample:
            logits = out[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = self._sampler(logprobs)
            pending.append(token)
            if self._logprobs is not None:
                reported = self._logprobs.arrays(logits, logprobs, token)
                pending.extend(reported.values())
        mx.eval(*pending)
        self.step += 1
        self.position += len(tokens)
        if token is None:
            return None
        token = int(token.item())
        self.logprob = self._logprobs.read(token, reported) if reported is not None else None
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


def generate(plan: GenerationPlan, deadline: float | None = None) -> Iterator[TokenEvent]:
    """Yield the plan's generated tokens one by one; the last event carries the Completion.
    Past `deadline` (time.monotonic()) generation ends as if max_tokens were reached ("length").

    With hooks, the capture is installed on the model while the generator runs and removed
    when it ends, fails or is closed (closing it early is how a caller cancels). Every forward
    step is recorded, including one last step over the final token so that every position has
    activations."""
    lm, sampling = plan.lm, plan.sampling
    prompt = list(plan.prompt)
    # One Capture installs both the hooks and the interventions; `recorded` is it when it records.
    targets = list(plan.targets or ())
    capture = Capture(lm, targets, plan.capture, plan.interventions) if targets or plan.interventions else None
    recorded = capture if targets else None
    eos = set(lm.tokenizer.eos_token_ids)
    text = VisibleText(lm.detokenizer(), sampling.stops)
    generated: list[int] = []
    logprobs: list[TokenLogprob] | None = [] if plan.logprobs.wanted else None
    with capture.installed(lm) if capture is not None else nullcontext():
        forward = Forward(lm, sampling, capture, plan.logprobs)
        token = forward(prompt)
        while True:
            index = len(generated)
            generated.append(token)
            logprob = forward.logprob
            if logprobs is not None:
                logprobs.append(logprob)
            if token in eos:  # not part of the text
                delta, finish = text.finish(), "stop"
            else:
                delta = text.add(token)
                finish = "stop" if text.stopped else None
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if finish is None and (len(generated) >= sampling.max_tokens or out_of_time):
                    delta += text.finish()
                    finish = "stop" if text.stopped else "length"
            if finish is not None:
                break
            yield TokenEvent(index, token, delta, index, len(prompt), capture=recorded, logprob=logprob)
            token = forward([token])
        if recorded is not None:
            forward([token], sample=False)  # the final token's own activations
    # Uninstalled before the last event: a caller that stops reading here leaves nothing behind.
    token_ids = prompt + generated
    tokens = token_texts(lm.tokenizer, token_ids)
    result = Completion(
        text=text.text, token_ids=token_ids, tokens=tokens, prompt_tokens=len(prompt), finish_reason=finish,
        model_id=lm.info.model_id, logprobs=logprobs,
        interventions=[iv.report(n) for iv, n in zip(plan.interventions, capture.touched)] if capture else [],
        capture=None if recorded is None else CaptureResult(
            capture_id="cap_" + secrets.token_hex(8), model_id=lm.info.model_id, token_ids=token_ids, tokens=tokens,
            prompt_tokens=len(prompt), hooks=capture.records),
    )
    yield TokenEvent(index, token, delta, index, len(prompt), finish, recorded, result, logprob)
