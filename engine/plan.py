"""A request resolved once, before any model work: the prompt's token ids, the sampling
parameters, the resolved hooks and the capture options, checked against the loaded model.

`plan()` is where every rule that needs the model lives (context length, vocabulary size,
layer names, the capture budget); what does not need the model is in engine/params.py. It
touches no MLX array, only the tokenizer and the model's facts, so the server runs it off
the MLX worker thread (tokenizing a long prompt never blocks the event loop or a generation).
The plan is then handed down to `engine.generate.generate` unchanged.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.errors import CaptureTooLarge, ContextLengthExceeded, InvalidArgument
from engine.hooks import HookTarget, estimate_bytes, hook_specs, resolve_hooks
from engine.model import LoadedModel
from engine.interventions import Intervention, Sources, VectorLookup, intervention_specs, resolve_interventions
from engine.params import CaptureOptions, HookSpec, InterventionSpec, LogprobOptions, SamplingParams

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class GenerationPlan:
    """Everything a generation needs, resolved and checked. `targets` is None without a capture."""

    lm: LoadedModel = field(repr=False, compare=False)
    prompt: tuple[int, ...] = field(repr=False)  # token ids
    sampling: SamplingParams
    targets: tuple[HookTarget, ...] | None
    capture: CaptureOptions
    capture_bytes: int = 0  # upper bound of the capture's size (estimate_bytes); 0 without hooks
    logprobs: LogprobOptions = field(default_factory=LogprobOptions)  # what to report at each step
    interventions: tuple[Intervention, ...] = ()  # in the order they apply

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens


def plan(
    lm: LoadedModel,
    *,
    messages: list[dict] | None = None,
    prompt: str | list[int] | None = None,
    sampling: SamplingParams | None = None,
    hooks: Iterable[HookSpec | dict] | None = None,
    capture: CaptureOptions | None = None,
    capture_budget_bytes: int | None = None,
    logprobs: LogprobOptions | None = None,
    interventions: Iterable[InterventionSpec | dict] | None = None,
    vectors: VectorLookup | None = None,
    sources: Sources | None = None,
) -> GenerationPlan:
    """Resolve a request on `lm`. Exactly one of `messages` (a chat, rendered with the model's
    chat template) or `prompt` (raw text, or token ids). `hooks=None` (or empty) captures
    nothing; `logprobs` says which log-probabilities to report at each step (none by default).
    `interventions` change tensors on every step; their `vector_id`s are looked up in `vectors`
    and their patch sources with `sources` (engine.interventions).
    Raises InvalidArgument (ContextLengthExceeded, UnknownHook) naming the argument at fault, or
    CaptureTooLarge when the capture could exceed `capture_budget_bytes`."""
    sampling = sampling if sampling is not None else SamplingParams()
    capture = capture if capture is not None else CaptureOptions()
    logprobs = logprobs if logprobs is not None else LogprobOptions()
    info = lm.info
    vocab = info.vocab_size
    if sampling.top_k > vocab:
        raise InvalidArgument(f"top_k is {sampling.top_k} but the model's vocabulary has {vocab} tokens; use at "
                              f"most {vocab} (0 turns top-k off)", "top_k")
    check_vocabulary(logprobs.token_ids, vocab, "logprobs.token_ids")
    targets = resolve_hooks(lm, hook_specs(hooks, "hooks"), "hooks") if hooks is not None else []

    ids, arg = prompt_ids(lm, messages=messages, prompt=prompt)
    limit, n = info.context_length, len(ids)
    if n >= limit:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {limit} tokens and the prompt has {n} tokens, which leaves no "
            f"room to generate; shorten the {'messages' if arg == 'messages' else 'prompt'}", arg)
    if n + sampling.max_tokens > limit:
        if "max_tokens" in sampling.model_fields_set:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} tokens and max_tokens "
                f"asks for {sampling.max_tokens}; lower max_tokens to at most {limit - n}", "max_tokens")
        # max_tokens left at its default means "as many as the default, or as fit" (OpenAI's own
        # default is the rest of the context); an explicit value is never shortened.
        sampling = sampling.model_copy(update={"max_tokens": limit - n})

    edits = ()
    if interventions is not None:
        edits = tuple(resolve_interventions(lm, intervention_specs(interventions), n, vectors=vectors,
                                            sources=sources))
    size = 0
    if targets:
        size = estimate_bytes(lm, targets, n, sampling.max_tokens, capture)
        if capture_budget_bytes is not None and size > capture_budget_bytes:
            raise CaptureTooLarge(
                f"this capture could need {size / 2**20:.1f} MiB, over the per-request budget of "
                f"{capture_budget_bytes / 2**20:.0f} MiB; capture fewer hooks, lower max_tokens, "
                "or capture positions 'last' or dtype 'float16'", "hooks")
    return GenerationPlan(lm=lm, prompt=tuple(ids), sampling=sampling, targets=tuple(targets) or None,
                          capture=capture, capture_bytes=size, logprobs=logprobs, interventions=edits)


def prompt_ids(lm: LoadedModel, *, messages: Any = None, prompt: Any = None) -> tuple[list[int], str]:
    """The prompt's token ids and the argument they came from ("messages" or "prompt")."""
    if messages is not None and prompt is not None:
        raise InvalidArgument("give either messages (a chat) or prompt (text or token ids), not both", "prompt")
    if messages is not None:
        return lm.chat_prompt(chat_messages(messages)), "messages"
    if prompt is None:
        raise InvalidArgument("give messages (a chat) or prompt (text or token ids)", "messages")
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgument("the prompt is empty", "prompt")
        ids = lm.text_prompt(prompt)
        if not ids:
            raise InvalidArgument(f"the prompt {prompt!r} has no tokens", "prompt")
        return ids, "prompt"
    if isinstance(prompt, (list, tuple)):
        return token_ids(prompt, lm.info.vocab_size), "prompt"
    raise InvalidArgument(f"prompt must be a string or a list of token ids (got {type(prompt).__name__})", "prompt")


def token_ids(values: list | tuple, vocab_size: int) -> list[int]:
    if not values:
        raise InvalidArgument("the prompt is empty", "prompt")
    ids = []
    for i, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InvalidArgument(f"prompt[{i}] must be a token id, an integer (got {t!r})", f"prompt[{i}]")
        ids.append(int(t))
    check_vocabulary(ids, vocab_size, "prompt")
    return ids


def check_vocabulary(ids: list[int], vocab_size: int, arg: str) -> None:
    """Every id is a token of the model: InvalidArgument naming `arg[i]`, the first one that is not."""
    i = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if i is not None:
        raise InvalidArgument(f"{arg}[{i}] is token id {ids[i]}, outside the model's vocabulary "
                              f"(ids 0 to {vocab_size - 1})", f"{arg}[{i}]")


def chat_messages(messages: Any) -> list[dict]:
    """Checked chat messages, as new dicts whose content is a string (OpenAI text parts joined).
    The caller's messages are left as they were."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidArgument(f"{where} must be an object with 'role' and 'content' (got {m!r})", where)
        if m.get("role") not in ROLES:
            raise InvalidArgument(f"{where}.role must be one of {', '.join(ROLES)} (got {m.get('role')!r})",
                                  f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidArgument(f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}} objects "
                                      "(the model reads text only)", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidArgument(f"{where}.content must be a string or a list of text parts (got {content!r})",
                                  f"{where}.content")
        out.append({**m, "content": content})
    return out
